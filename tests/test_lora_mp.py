"""LoRA (model.lora, through PEFT) on real DeepSpeed ranks: CPU accelerator, gloo, no mocks.

One 2-rank launch runs every LoRA stage (ZeRO-3, ZeRO-2, auto, TDPO-2, a resume, the FPO cache
with and without LoRA, FPO training); one 1-rank launch gives the single-rank losses and a resume
on another world size.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import write_recipe
from safetensors.torch import load_file
from test_train_mp import _launch

from fpo_ds.tools.demo import toy

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parent.parent
LN2 = math.log(2.0)
LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
DEFAULTS = {
    "model": {"lora": LORA},
    "loss": {"method": "dpo"},
    "train": {"lr": 1e-2, "max_steps": 4},
    "output": {"save_final": False},  # checkpoints only where a test reads them
}


def _recipe(tmp: Path, world: Path, name: str, **sections) -> str:
    return write_recipe(tmp, world, name, DEFAULTS, **sections)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    g = toy.write_world(tmp / "world", "gemma2", n_train=32, n_eval=8)
    z2 = {"config": str(ROOT / "ds_configs" / "zero2_fp32.json")}
    part = _recipe(tmp, g, "part", train={"max_steps": 2}, output={"save_every": 2})
    toy.random_sae("jumprelu", 64, 96, 3, seed=1).save_model(str(tmp / "sae"))
    fpo = dict(loss={"method": "fpo"}, sae={"path": str(tmp / "sae"), "k": 8})
    plain = {"name_or_path": str(g / "model"), "lora": {"r": 0}}
    spec = [
        {"name": "z3", "stage": "train", "dump": True, "recipe": _recipe(tmp, g, "z3", output={"save_final": True})},
        {"name": "part", "stage": "train", "recipe": part},
        {"name": "rest", "stage": "train", "recipe": part, "overrides": ["train.max_steps=4"]},
        {"name": "z2", "stage": "train", "recipe": _recipe(tmp, g, "z2", deepspeed=z2)},
        {"name": "ckpt", "stage": "train",
         "recipe": _recipe(tmp, g, "ckpt", model={"gradient_checkpointing": True})},
        {"name": "auto", "stage": "train", "recipe": _recipe(tmp, g, "auto", deepspeed={"config": "auto"})},
        {"name": "tdpo2", "stage": "train", "recipe": _recipe(tmp, g, "tdpo2", loss={"method": "tdpo2"})},
        {"name": "cache_lora", "stage": "build-cache",
         "recipe": _recipe(tmp, g, "cache-lora", **fpo, cache={"dir": str(tmp / "cache-lora")})},
        {"name": "cache_plain", "stage": "build-cache",
         "recipe": _recipe(tmp, g, "cache-plain", **fpo, model=plain, cache={"dir": str(tmp / "cache-plain")})},
        {"name": "fpo", "stage": "train",
         "recipe": _recipe(tmp, g, "fpo", **fpo, cache={"dir": str(tmp / "cache-lora")})},
    ]  # fmt: skip
    two = _launch(2, spec, tmp / "out2")
    one_spec = [
        {"name": "z3_1rank", "stage": "train", "recipe": _recipe(tmp, g, "z3-1rank")},
        {
            "name": "rest_1rank",  # the 2-rank ZeRO-3 checkpoint at step 2, resumed on 1 rank
            "stage": "train",
            "recipe": part,
            "overrides": [
                f"output.resume={tmp / 'runs' / 'part' / 'checkpoints' / 'step_00000002'}",
                f"output.dir={tmp / 'runs' / 'rest-1rank'}",
                "train.max_steps=4",
            ],
        },
    ]
    one = _launch(1, one_spec, tmp / "out1")
    return {"two": two, "one": one, "tmp": tmp, "world": g}


def _hist(res, name, key="loss"):
    return [h[key] for h in res[name]["history"]]


def test_lora_zero3_starts_at_ln2_and_trains_only_the_adapters(runs):
    from transformers import AutoModelForCausalLM

    hist = runs["two"]["z3"]["history"]
    assert abs(hist[0]["loss"] - LN2) < 1e-6 and abs(hist[0]["rewards/margins"]) < 1e-6
    assert hist[-1]["grad_norm"] > 0 and hist[-1]["loss"] != hist[0]["loss"]
    # weights gathered under GatheredParameters on every rank (never ZeRO-3's empty placeholders)
    state = torch.load(runs["tmp"] / "out2" / "z3.pt")["state"]
    lm = AutoModelForCausalLM.from_pretrained(runs["world"] / "model", dtype=torch.float32)
    base = lm.state_dict()
    linear = [n for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    adapters = {n: v for n, v in state.items() if ".lora_" in n}
    assert len(linear) == 7 * lm.config.num_hidden_layers  # all-linear: q,k,v,o,gate,up,down of every block
    assert len(adapters) == 2 * len(linear)  # lora_A and lora_B on each
    assert all(v.abs().sum() > 0 for n, v in adapters.items() if "lora_B" in n)  # B starts at 0: it trained
    frozen = {n.replace(".base_layer", ""): v for n, v in state.items() if ".lora_" not in n}
    assert frozen.keys() <= base.keys() and len(frozen) >= len(base) - 1  # lm_head may be tied to the embedding
    for name, value in frozen.items():
        assert value.numel() > 0
        torch.testing.assert_close(value, base[name], rtol=0, atol=0)


def test_lora_reference_is_the_policy_with_adapters_off(runs):
    log = (runs["tmp"] / "out2" / "log.txt").read_text()
    assert "reference: no reference model loaded (LoRA" in log and "saved" in log
    assert "LoRA (PEFT): r 4" in log
    assert runs["two"]["z3"]["reference"] == "LiveReference"
    # TDPO-2: the reference KL route through the adapters-off pass is 0 at the start, positive after updates
    hist = runs["two"]["tdpo2"]["history"]
    assert abs(hist[0]["loss"] - LN2) < 1e-6
    assert hist[0]["tdpo/seq_kl_rejected"] < 1e-6 and hist[-1]["tdpo/seq_kl_rejected"] > 0


def test_lora_same_losses_on_every_stage_and_world_size(runs):
    z3 = runs["two"]["z3"]["history"]
    for name, res in (("z2", runs["two"]), ("auto", runs["two"]), ("ckpt", runs["two"]), ("z3_1rank", runs["one"])):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert _hist(res, name, key) == pytest.approx([h[key] for h in z3], abs=1e-5), (name, key)
    info = json.loads((runs["tmp"] / "runs" / "auto" / "run_info.json").read_text())
    assert info["deepspeed_config"]["zero_optimization"] == {"stage": 0}  # LoRA states of a tiny model fit whole
    log = (runs["tmp"] / "out2" / "log.txt").read_text()
    assert "LoRA adapters that train" in log  # auto counted the adapters, not every weight, as trainable


def test_lora_checkpoint_holds_only_trainable_state_and_resumes_exactly(runs):
    full = _hist(runs["two"], "z3")
    rest = runs["two"]["rest"]["history"]
    assert [h["step"] for h in rest] == [3, 4]
    assert [h["loss"] for h in rest] == pytest.approx(full[2:], abs=1e-6)
    other_world = runs["one"]["rest_1rank"]["history"]
    assert [h["loss"] for h in other_world] == pytest.approx(full[2:], abs=1e-5)
    tag = runs["tmp"] / "runs" / "z3" / "checkpoints" / "step_00000004"
    marker = json.loads((tag / "COMPLETE.json").read_text())
    assert marker["trainable_only"] is True
    model_states = sum(v["bytes"] for k, v in marker["files"].items() if "model_states" in k)
    params = toy_params(runs["world"])
    assert model_states < params * 4  # far below the frozen base's fp32 bytes (placeholders excluded)
    assert "trainable state only (LoRA adapters" in (runs["tmp"] / "out2" / "log.txt").read_text()


def toy_params(world: Path) -> int:
    from fpo_ds.zero_auto import saved_params

    return saved_params(world / "model")


def test_lora_cache_ignores_lora_and_fpo_trains_from_it(runs):
    tmp = runs["tmp"]
    a = json.loads((tmp / "cache-lora" / "manifest.json").read_text())
    b = json.loads((tmp / "cache-plain" / "manifest.json").read_text())
    assert a["fingerprints"] == b["fingerprints"] and a["fingerprints"]["features"]
    for pa, pb in zip(a["parts"], b["parts"], strict=True):
        ta, tb = load_file(tmp / "cache-lora" / pa["file"]), load_file(tmp / "cache-plain" / pb["file"])
        assert ta.keys() == tb.keys()
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=0)
    hist = runs["two"]["fpo"]["history"]
    assert runs["two"]["fpo"]["reference"] == "Reader"
    assert abs(hist[0]["loss"] - LN2) < 1e-5  # the adapted policy equals the base at step 0
    assert all(math.isfinite(h["loss"]) for h in hist) and hist[-1]["grad_norm"] > 0
    assert hist[0]["fpo/feature_mse_chosen"] < 1e-8 < hist[-1]["fpo/feature_mse_chosen"]


def test_lora_export_adapter_and_merged(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fpo_ds import checkpoint, data, lora
    from fpo_ds import config as C
    from fpo_ds import model as M

    tag = runs["tmp"] / "runs" / "z3" / "checkpoints" / "step_00000004"
    adapter = checkpoint.export(tag, tmp_path / "adapter")
    merged = checkpoint.export(tag, tmp_path / "merged", form="merged")
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    assert "PEFT LoRA adapter" in (adapter / "README.md").read_text()
    assert "merged model" in (merged / "README.md").read_text()
    assert str(runs["world"] / "model") in (adapter / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(runs["world"] / "model", dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(adapter)).eval()
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    via_loader = lora.load_causal_lm(adapter).eval()  # what generate and eval load
    tok = M.load_tokenizer(str(adapter))
    pairs, _ = data.load_pairs(C.load(runs["tmp"] / "z3.yaml").data, tok)
    batch = data.collate(pairs[:2], tok.pad_token_id)
    with torch.no_grad():
        want = peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        for other in (plain, via_loader):
            got = other(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        with peft.disable_adapter():  # and the adapters matter: the base alone gives other logits
            off = peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert (off - want).abs().max() > 1e-4
    with pytest.raises(ValueError, match="does not fit this checkpoint"):
        checkpoint.export(tag, tmp_path / "full", form="full")
