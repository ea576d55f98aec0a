"""LoRA in one process: the model.lora block, PEFT wrapping, the adapters-off reference, auto's memory."""

import pytest
import torch

from fpo_ds import config as C
from fpo_ds import lora, zero_auto

BASE = {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}, "loss": {"method": "dpo"}}


def _recipe(**lora_keys) -> C.Recipe:
    return C.from_dict({**BASE, "model": {"name_or_path": "m", "lora": lora_keys}})


def test_lora_block_validates_strictly():
    r = _recipe(r=8, target_modules="all-linear")
    assert r.model.lora.enabled and r.model.lora.alpha == 16.0
    assert not C.from_dict(BASE).model.lora.enabled  # off by default
    assert _recipe(r=8, target_modules=["q_proj", "v_proj"]).model.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(C.ConfigError) as e:
        _recipe(
            r=-1, rank=4, alpha=0, dropout=1.0, quantize="4bit", target_modules="q_proj", modules_to_save=["lm_head"]
        )
    text = str(e.value)
    for want in (
        "model.lora.rank: unknown key",
        "model.lora.r: must be >= 0",
        "model.lora.quantize: '4bit' is not supported: a 4-bit base (QLoRA) needs bitsandbytes on a GPU",
    ):
        assert want in text, text
    with pytest.raises(C.ConfigError) as e:
        _recipe(r=4, alpha=0, dropout=1.0, target_modules="q_proj", modules_to_save=["lm_head"])
    text = str(e.value)
    assert "model.lora.modules_to_save: lm_head is not supported" in text
    assert "model.lora.alpha: must be a finite number > 0" in text
    assert "model.lora.dropout: must be in [0, 1)" in text
    assert "model.lora.target_modules: 'q_proj': use all-linear or a list of module names (e.g. [q_proj])" in text
    with pytest.raises(C.ConfigError, match="QLoRA"):
        _recipe(quantize=True)  # refused even with LoRA off


def test_lora_changes_are_refused_on_resume():
    from fpo_ds import resume

    refused, _ = resume.recipe_changes(C.to_dict(_recipe(r=8)), C.to_dict(_recipe(r=16)))
    assert "model.lora.r" in refused


def test_adapters_off_is_the_base_model_and_only_adapters_train(world):
    from transformers import AutoModelForCausalLM

    from fpo_ds import data
    from fpo_ds import model as M

    base = AutoModelForCausalLM.from_pretrained(world / "model", dtype=torch.float32)
    lm = AutoModelForCausalLM.from_pretrained(world / "model", dtype=torch.float32)
    cfg = _recipe(r=4, target_modules=["q_proj", "down_proj"], modules_to_save=["norm"]).model.lora
    lora.wrap(lm, cfg)
    train = lora.trainable(lm)
    assert train and all(".lora_" in n or "modules_to_save" in n for n in train)
    assert any("norm.modules_to_save" in n for n in train)
    assert sum(p.numel() for p in train.values()) == lora.count_trainable(_recipe_for(world, cfg).model)
    for p in train.values():  # make the adapters do something
        torch.nn.init.normal_(p, std=0.1)
    tok = M.load_tokenizer(str(world / "model"))
    pairs, _ = data.load_pairs(_recipe_for(world, cfg).data, tok)
    batch = data.collate(pairs[:2], tok.pad_token_id)
    with torch.no_grad():
        want = M.sequence_logps(base, batch).sum_logps
        with lora.adapters_off(lm):
            off = M.sequence_logps(lm, batch).sum_logps
        on = M.sequence_logps(lm, batch).sum_logps
    torch.testing.assert_close(off, want, rtol=0, atol=1e-5)
    assert (on - want).abs().max() > 1e-3
    assert lora.trainable(lm).keys() == train.keys()  # the switch restores requires_grad
    tied = AutoModelForCausalLM.from_pretrained(world / "model", dtype=torch.float32)
    with pytest.raises(ValueError, match="embed_tokens is tied to the LM head"):
        lora.wrap(tied, _recipe(r=4, modules_to_save=["embed_tokens"]).model.lora)


def _recipe_for(world, lora_cfg) -> C.Recipe:
    import dataclasses

    raw = {**BASE, "model": {"name_or_path": str(world / "model"), "lora": dataclasses.asdict(lora_cfg)}}
    raw["data"] = {"path": str(world / "data" / "train.jsonl"), "max_length": 48, "max_prompt_length": 24}
    return C.from_dict(raw)


def test_auto_counts_lora_memory():
    facts = zero_auto.ModelFacts(params=9_000_000_000, hidden=3584, layers=42, vocab=256_000)
    r = C.from_dict({**BASE, "train": {"micro_batch_size": 1}, "data": {"path": "d.jsonl", "max_length": 1024}})
    full = zero_auto.rank_bytes(r, facts, 8, 2, 0)
    adapters = 54_000_000
    lo = zero_auto.rank_bytes(r, facts, 8, 2, 0, trainable=adapters)
    assert full["reference"] == 18_000_000_000 and "reference" not in lo  # no second copy with LoRA
    assert lo["gradients"] == adapters * 2 and lo["optimizer"] == adapters * 12
    assert lo["weights"] == (9_000_000_000 + adapters) * 2
    # 80 GB: full-parameter DPO needs ZeRO-3 on 8 GPUs; with LoRA the 9B model fits whole (stage 0)
    assert zero_auto.choose(r, facts, 8, 80 * 10**9, True).systems["zero_optimization"]["stage"] == 3
    choice = zero_auto.choose(r, facts, 8, 80 * 10**9, True, trainable=adapters)
    assert choice.systems["zero_optimization"]["stage"] == 0
    assert "54,000,000 of them LoRA adapters" in choice.reason


def test_cache_fingerprint_ignores_lora(tokenizer):
    from fpo_ds import cache

    plain = C.from_dict({**BASE, "loss": {"method": "dpo", "reference": "offline"}, "cache": {"dir": "c"}})
    with_lora = C.from_dict(
        {**BASE, "model": {"name_or_path": "m", "lora": {"r": 8}}, "loss": {"method": "dpo", "reference": "offline"}}
        | {"cache": {"dir": "c"}}
    )
    assert cache.fingerprints(plain, tokenizer, "fp") == cache.fingerprints(with_lora, tokenizer, "fp")


def test_plan_models_lora_memory_and_flops():
    from fpo_ds.tools.planner import lora_plan, shapes

    p, t = 9_000_000_000, 50_000_000
    assert lora_plan.flops_per_token(p, None, False, True) == 8 * p  # 6P training + 2P live reference
    assert lora_plan.flops_per_token(p, t, False, True) == 4 * p + 6 * t + 2 * p  # no weight gradients
    assert lora_plan.flops_per_token(p, t, True, False) == 4 * p + 6 * t + 2 * p  # FPO: recompute, no reference
    recipe = C.load("recipes/gemma-2-9b.yaml", ["model.lora.r=16"])
    out = "\n".join(lora_plan.lines(recipe, shapes.model_config("google/gemma-2-9b"), 9_241_705_984, 1, 80.0))
    # 42 blocks x 16 x (q 3584+4096, k and v 3584+2048 each, o 4096+3584, gate/up/down 3584+14336 each)
    assert "54,018,048 adapter parameters train" in out
    assert "stage 0 (data parallel, no ZeRO)" in out  # one 80 GB GPU holds the 9B FPO recipe with LoRA r=16


def test_generate_accepts_an_adapter_dir_as_its_merged_model(world, tmp_path):
    """`fpo-ds generate` on a PEFT adapter directory answers as the merged model does (HF backend)."""
    from test_generate import _cmd, _files
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fpo_ds import cli

    lm = AutoModelForCausalLM.from_pretrained(world / "model", dtype=torch.float32)
    peft = lora.wrap(lm, _recipe(r=4).model.lora, seed=0)
    for name, p in lora.trainable(lm).items():  # adapters that change the answers
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(1))
    peft.peft_config["default"].base_model_name_or_path = str(world / "model")
    peft.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(world / "model").save_pretrained(tmp_path / "adapter")
    peft.merge_and_unload().save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(world / "model").save_pretrained(tmp_path / "merged")
    assert cli.main(["generate", *_cmd(tmp_path / "adapter", tmp_path / "a")]) in (0, None)
    assert cli.main(["generate", *_cmd(tmp_path / "merged", tmp_path / "m")]) in (0, None)
    assert cli.main(["generate", *_cmd(world / "model", tmp_path / "base")]) in (0, None)
    adapted, merged, base = _files(tmp_path / "a"), _files(tmp_path / "m"), _files(tmp_path / "base")
    assert adapted == merged and adapted != base
