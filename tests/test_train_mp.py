"""Real multi-rank training: DeepSpeed ZeRO-3 on the CPU accelerator, gloo, 2 ranks, no mocks.

Two launches serve all assertions (start-up costs ~15 s each): one 2-rank launch runs every
method on a tiny Gemma2 and a tiny Llama plus resume/offline/export runs, one 1-rank launch
provides the single-process references for the invariance checks.
"""

import glob
import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env
from helpers import write_recipe as _recipe

from fpo_ds import pipeline
from fpo_ds.tools.demo import toy

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parent.parent
METHODS = ["sft", "dpo", "ipo", "simpo", "tdpo1", "tdpo2"]
LN2 = math.log(2.0)


def _launch(nproc: int, spec: list, out: Path, timeout: int = 900) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    port = 29500 + (os.getpid() + nproc) % 1000
    entry = [str(ROOT / "tests" / "mp_driver.py"), str(out / "spec.json"), str(out)]
    proc = pipeline.torchrun(
        entry, nproc, port=port, env=subprocess_env(), cwd=ROOT, capture=True, timeout=timeout, check=False
    )
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    # no /dev/shm buffers: fpo_ds.dist keeps DeepSpeed from creating its CPU all-reduce buffers at all
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    worlds = {a: toy.write_world(tmp / f"world-{a}", a, n_train=32, n_eval=8) for a in ("gemma2", "llama")}
    g = worlds["gemma2"]
    spec = []
    for arch, world in worlds.items():
        for m in METHODS:
            spec.append(
                {
                    "name": f"{arch}-{m}",
                    "stage": "train",
                    "recipe": _recipe(tmp, world, f"{arch}-{m}", loss={"method": m}),
                }
            )
    learn = dict(loss={"method": "dpo"}, train={"max_steps": 24, "epochs": 3, "lr": 3e-3}, output={"save_final": False})
    spec.append({"name": "learn", "stage": "train", "recipe": _recipe(tmp, g, "learn", **learn)})
    full = _recipe(tmp, g, "full", loss={"method": "dpo"}, train={"max_steps": 4}, output={"save_every": 2})
    spec.append({"name": "full", "stage": "train", "recipe": full})
    part = _recipe(tmp, g, "part", loss={"method": "dpo"}, train={"max_steps": 2})
    spec.append({"name": "part", "stage": "train", "recipe": part})
    spec.append({"name": "rest", "stage": "train", "recipe": part, "overrides": ["train.max_steps=4"]})
    off = dict(loss={"method": "dpo", "reference": "offline"}, cache={"dir": str(tmp / "cache")})
    spec.append({"name": "cache", "stage": "build-cache", "recipe": _recipe(tmp, g, "cache", **off)})
    spec.append({"name": "offline", "stage": "train", "recipe": _recipe(tmp, g, "offline", **off)})
    spec.append(
        {
            "name": "bf16",
            "stage": "train",
            "recipe": _recipe(
                tmp,
                g,
                "bf16",
                loss={"method": "dpo"},
                deepspeed={"config": str(ROOT / "ds_configs/zero3_bf16.json")},
                logging={"progress_bar": False, "tensorboard": True, "wandb": True},
            ),
        }
    )
    spec.append(
        {
            "name": "zero2",
            "stage": "train",
            "recipe": _recipe(
                tmp,
                g,
                "zero2",
                loss={"method": "dpo"},
                deepspeed={"config": str(ROOT / "ds_configs/zero2_bf16.json")},
                model={"gradient_checkpointing": True},
            ),
        }
    )
    spec.append(
        {
            "name": "auto",
            "stage": "train",
            "recipe": _recipe(
                tmp, g, "auto", loss={"method": "dpo"}, deepspeed={"config": "auto"}, output={"save_every": 2}
            ),
        }
    )
    spec.append(
        {
            "name": "offload",  # ZeRO-Offload: DeepSpeed's CPU Adam (JIT-compiled once, ~35 s on 2 cores)
            "stage": "train",
            "recipe": _recipe(
                tmp,
                g,
                "offload",
                loss={"method": "dpo"},
                deepspeed={"config": str(ROOT / "ds_configs/zero3_offload_bf16.json")},
            ),
        }
    )
    inv = dict(loss={"method": "dpo"}, train={"global_batch_size": 2, "max_steps": 3})
    spec.append({"name": "ranks2_micro1", "stage": "train", "dump": True, "recipe": _recipe(tmp, g, "r2m1", **inv)})
    # FPO: a JumpReLU SAE on the last block's residual stream, saved with sae-lens's own save_model.
    toy.random_sae("jumprelu", 64, 96, 3, seed=1).save_model(str(tmp / "sae"))
    toy.random_sae("jumprelu", 64, 96, 3, seed=2).save_model(str(tmp / "sae-other"))
    fpo = dict(loss={"method": "fpo"}, sae={"path": str(tmp / "sae"), "k": 8}, cache={"dir": str(tmp / "fpo-cache")})
    spec.append({"name": "fpo_cache", "stage": "build-cache", "recipe": _recipe(tmp, g, "fpo-cache", **fpo)})
    spec.append({"name": "fpo", "stage": "train", "recipe": _recipe(tmp, g, "fpo", **fpo)})
    spec.append(
        {
            "name": "fpo_ckpt",
            "stage": "train",
            "recipe": _recipe(tmp, g, "fpo-ckpt", **fpo, model={"gradient_checkpointing": True}),
        }
    )
    spec.append(
        {
            "name": "dpo_from_fpo_cache",
            "stage": "train",
            "recipe": _recipe(
                tmp, g, "dpo-fpo-cache", loss={"method": "dpo", "reference": "offline"}, cache=fpo["cache"]
            ),
        }
    )
    # held-out metrics: FPO against the held-out part of its cache, DPO against its live reference
    held = dict(fpo, data={"eval_fraction": 0.25}, cache={"dir": str(tmp / "fpo-eval-cache")})
    spec.append({"name": "eval_cache", "stage": "build-cache", "recipe": _recipe(tmp, g, "eval-cache", **held)})
    ev = dict(held, train={"max_steps": 4, "eval_every": 2}, output={"save_every": 2})
    spec.append({"name": "fpo_eval", "stage": "train", "recipe": _recipe(tmp, g, "fpo-eval", **ev)})
    ev_part = _recipe(tmp, g, "fpo-eval-part", **dict(ev, train={"max_steps": 2, "eval_every": 2}))
    spec.append({"name": "fpo_eval_part", "stage": "train", "recipe": ev_part})
    spec.append({"name": "fpo_eval_rest", "stage": "train", "recipe": ev_part, "overrides": ["train.max_steps=4"]})
    dpo_ev = dict(loss={"method": "dpo"}, data={"eval_fraction": 0.25}, train={"eval_every": 3})
    spec.append({"name": "dpo_eval", "stage": "train", "recipe": _recipe(tmp, g, "dpo-eval", **dpo_ev)})
    spec.append({"name": "sae", "check": "sae"})
    spec.append({"name": "zero_init", "check": "zero_init", "recipe": full})
    two = _launch(2, spec, tmp / "out2")
    one_spec = [
        {"name": "fpo_1rank", "stage": "train", "recipe": _recipe(tmp, g, "fpo-1rank", **fpo)},
        {"name": "fpo_eval_1rank", "stage": "train", "recipe": _recipe(tmp, g, "fpo-eval-1rank", **ev)},
        {
            "name": "auto_resume_1rank",  # the 2-rank stage-0 checkpoint, resumed on 1 rank (no conversion)
            "stage": "train",
            "recipe": str(tmp / "auto.yaml"),
            "overrides": [
                f"output.resume={tmp / 'runs' / 'auto' / 'checkpoints' / 'step_00000002'}",
                f"output.dir={tmp / 'runs' / 'auto-1rank'}",
            ],
        },
        {
            "name": "rank1_micro2",
            "stage": "train",
            "dump": True,
            "recipe": _recipe(tmp, g, "r1m2", **inv),
            "overrides": ["train.micro_batch_size=2"],
        },
        {"name": "rank1_micro1", "stage": "train", "dump": True, "recipe": _recipe(tmp, g, "r1m1", **inv)},
    ]
    one = _launch(1, one_spec, tmp / "out1")
    return {"two": two, "one": one, "tmp": tmp, "fpo_recipe": _recipe(tmp, g, "fpo-check", **fpo)}


def _losses(res, name):
    return [h["loss"] for h in res[name]["history"]]


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_every_method_trains_and_step0_is_ln2(runs, arch):
    res = runs["two"]
    for m in METHODS:
        hist = res[f"{arch}-{m}"]["history"]
        assert [h["step"] for h in hist] == [1, 2, 3] and all(math.isfinite(h["loss"]) for h in hist)
        assert hist[-1]["grad_norm"] > 0 and hist[0]["tokens_per_s"] > 0
        if m in ("dpo", "tdpo1", "tdpo2"):
            assert abs(hist[0]["loss"] - LN2) < 1e-4, (m, hist[0]["loss"])
            assert abs(hist[0]["rewards/margins"]) < 1e-4
        if m in ("tdpo1", "tdpo2"):  # the sequence KL is logged: 0 at the reference, positive after updates
            assert hist[0]["tdpo/seq_kl_rejected"] < 1e-6 and hist[-1]["tdpo/seq_kl_rejected"] > 0
        if m == "ipo":  # (0 - 1/(2 beta))^2 = 25 at beta 0.1
            assert abs(hist[0]["loss"] - 25.0) < 1e-3


def test_loss_falls_on_learnable_toy_set(runs):
    losses = _losses(runs["two"], "learn")
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.05, losses
    assert runs["two"]["learn"]["history"][-1]["rewards/accuracies"] >= 0.5


def test_resume_reproduces_uninterrupted_losses(runs):
    full, rest = _losses(runs["two"], "full"), runs["two"]["rest"]["history"]
    assert [h["step"] for h in rest] == [3, 4]
    assert [h["loss"] for h in rest] == pytest.approx(full[2:], abs=1e-5)
    # the cumulative token count and the epoch continue where the checkpoint left them
    for key in ("num_tokens", "epoch"):
        assert [h[key] for h in rest] == [h[key] for h in runs["two"]["full"]["history"][2:]]
    ckpts = sorted(p.name for p in (runs["tmp"] / "runs" / "part" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000004"]
    assert (runs["tmp"] / "runs" / "part" / "checkpoints" / "latest").read_text() == "step_00000004"


def test_offline_reference_matches_live(runs):
    live, off = _losses(runs["two"], "gemma2-dpo"), _losses(runs["two"], "offline")
    assert off == pytest.approx(live, abs=1e-5)
    assert runs["two"]["offline"]["reference"] == "Reader"  # no reference model was loaded
    assert runs["two"]["gemma2-dpo"]["reference"] == "LiveReference"  # a frozen engine run each step
    manifest = json.loads((runs["tmp"] / "cache" / "manifest.json").read_text())
    assert [p["file"] for p in manifest["parts"]] == [
        "part-00000-of-00002.safetensors",
        "part-00001-of-00002.safetensors",
    ]
    assert sum(p["rows"] for p in manifest["parts"]) == 32


def test_bf16_zero2_and_offload_train(runs):
    for name in ("bf16", "zero2", "offload"):
        hist = runs["two"][name]["history"]
        assert len(hist) == 3 and all(math.isfinite(h["loss"]) for h in hist)
        assert abs(hist[0]["loss"] - LN2) < 2e-2  # bf16 logits: ln 2 up to rounding


def test_auto_picks_plain_data_parallel_for_a_tiny_model_and_matches_zero3(runs, tmp_path):
    from fpo_ds import checkpoint

    info = json.loads((runs["tmp"] / "runs" / "auto" / "run_info.json").read_text())
    assert info["deepspeed_config"]["zero_optimization"] == {"stage": 0}
    assert "bf16" not in info["deepspeed_config"]  # fp32 on the CPU accelerator
    # same recipe as gemma2-dpo but for the JSON: stage 0 and ZeRO-3 train the same numbers, and the
    # gradient norm (which DeepSpeed keeps none of at stage 0 in fp32) is the same too
    auto, z3 = runs["two"]["auto"]["history"], runs["two"]["gemma2-dpo"]["history"]
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert [h[key] for h in auto] == pytest.approx([h[key] for h in z3], abs=1e-5), key
    assert all(h["grad_norm"] > 0 for h in auto)
    # a stage-0 checkpoint resumes on another world size as it is, and exports
    resumed = runs["one"]["auto_resume_1rank"]["history"]
    assert [h["step"] for h in resumed] == [3] and resumed[0]["loss"] == pytest.approx(auto[2]["loss"], abs=1e-5)
    tag = runs["tmp"] / "runs" / "auto" / "checkpoints" / "step_00000003"
    assert not checkpoint.partitioned(tag)
    from safetensors.torch import load_file

    got = load_file(checkpoint.export(tag, tmp_path / "hf") / "model.safetensors")
    z3_tag = runs["tmp"] / "runs" / "gemma2-dpo" / "checkpoints" / "step_00000003"
    want = load_file(checkpoint.export(z3_tag, tmp_path / "hf-z3") / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:  # 3 Adam steps at lr 1e-3: summation-order noise in tiny gradients moves a weight ~1e-5
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-4)


def test_tensorboard_and_offline_wandb_when_asked(runs):
    run = runs["tmp"] / "runs" / "bf16"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "wandb").glob("offline-run-*"))


def test_zero_init_never_materialises_the_model(runs):
    per_rank = runs["two"]["zero_init"]["per_rank"]
    assert len(per_rank) == 2  # both ranks reported
    for rank_res in per_rank:
        assert rank_res["local_numel"] == 0 and rank_res["ds_numel"] > 100_000


def test_metrics_jsonl_written_per_step(runs):
    lines = (runs["tmp"] / "runs" / "gemma2-dpo" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "lr",
        "grad_norm",
        "logits/chosen",
        "logits/rejected",
        "num_tokens",
        "epoch",
        "tokens_per_s",
        "samples_per_s",
        "step_time_s",
        "peak_mem_mib",
    ):
        assert key in recs[0]
    assert (runs["tmp"] / "runs" / "gemma2-dpo" / "recipe.yaml").is_file()
    # TRL's cumulative count: every input token (prompt, chosen and rejected, all ranks) so far
    tokens = [r["step_tokens"] for r in recs]
    assert [r["num_tokens"] for r in recs] == pytest.approx([sum(tokens[: i + 1]) for i in range(3)])
    assert [r["epoch"] for r in recs] == pytest.approx([1 / 8, 2 / 8, 3 / 8])  # 32 pairs, global batch 4
    assert all(r["logits/chosen"] != r["logits/rejected"] for r in recs)
    done = json.loads((runs["tmp"] / "runs" / "gemma2-dpo" / "DONE.json").read_text())
    assert "3 steps" in done["summary"] and "checkpoints/step_00000003" in done["summary"]


EVAL_KEYS = (
    "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected",
    "eval_logits/chosen", "eval_accuracy/length_normalised", "eval_time_s",
)  # fmt: skip


def test_held_out_metrics_every_n_steps_resume_exactly_and_match_one_rank(runs):
    hist = runs["two"]["fpo_eval"]["history"]
    evald = [h["step"] for h in hist if "eval_loss" in h]
    assert evald == [2, 4]
    for h in (hist[1], hist[3]):
        for key in (*EVAL_KEYS, "eval_fpo/feature_mse_chosen", "eval_fpo/feature_mse_rejected"):
            assert math.isfinite(h[key]), key
    assert hist[1]["eval_fpo/feature_mse_chosen"] > 0  # the policy moved off the reference after 2 steps
    assert 0 <= hist[1]["eval_accuracy/dpo_reward"] <= 1  # the cache holds the reference's log-probs too
    # a restart at step 2 gives the uninterrupted run's steps 3-4, held-out metrics included
    rest = runs["two"]["fpo_eval_rest"]["history"]
    assert [h["step"] for h in rest] == [3, 4]
    for key in ("loss", "eval_loss", "eval_rewards/accuracies", "eval_fpo/feature_mse_chosen"):
        assert rest[1][key] == pytest.approx(hist[3][key], abs=1e-5), key
    # distributed held-out pass == single process (8 held-out pairs: 4 per rank vs 8 on one)
    one = runs["one"]["fpo_eval_1rank"]["history"]
    for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_fpo/feature_mse_rejected"):
        assert one[3][key] == pytest.approx(hist[3][key], abs=1e-4), key
    recs = [json.loads(x) for x in (runs["tmp"] / "runs" / "fpo-eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "eval_rewards/accuracies" in r] == [0, 2, 4]  # step 0: the starting policy
    # at step 0 the policy is the reference: zero margins, zero feature distance, DPO loss ln 2
    assert recs[0]["eval_rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert recs[0]["eval_fpo/feature_mse_chosen"] == pytest.approx(0, abs=1e-4)
    assert recs[0]["eval_loss"] == pytest.approx(LN2, abs=1e-4)


def test_held_out_metrics_with_a_live_reference(runs):
    hist = runs["two"]["dpo_eval"]["history"]
    last = hist[-1]
    assert [h["step"] for h in hist if "eval_loss" in h] == [3]
    assert 0 <= last["eval_accuracy/dpo_reward"] <= 1 and 0 <= last["eval_accuracy/length_normalised"] <= 1
    # for DPO the method's reward accuracy is the DPO reward accuracy
    assert last["eval_rewards/accuracies"] == pytest.approx(last["eval_accuracy/dpo_reward"])
    assert runs["two"]["dpo_eval"]["n_pairs"] == 24  # 32 rows less the 8 held out


def test_save_final_off_writes_no_checkpoint(runs):
    run = runs["tmp"] / "runs" / "learn"
    assert (run / "DONE.json").is_file() and not list(run.glob("checkpoints/step_*"))
    assert "output.save_final=false" in json.loads((run / "DONE.json").read_text())["summary"]


def _dump(runs, name):
    d = runs["tmp"] / ("out2" if name.startswith("ranks2") else "out1")
    return torch.load(d / f"{name}.pt")


def test_gradient_accumulation_and_world_size_invariance(runs):
    a = _dump(runs, "ranks2_micro1")["state"]  # 2 ranks x micro 1 x accum 1
    b = _dump(runs, "rank1_micro2")["state"]  # 1 rank x micro 2 x accum 1
    c = _dump(runs, "rank1_micro1")["state"]  # 1 rank x micro 1 x accum 2
    assert a.keys() == b.keys() == c.keys() and all(v.numel() > 0 for v in a.values())
    for k in a:
        # Same micro-batch shapes, different placement (2 ranks vs accumulation on 1): bitwise equal.
        assert torch.equal(a[k], c[k]), k
        # micro 2 pads two sequences into one forward, so float rounding differs; Adam divides by
        # sqrt(v), which can magnify rounding noise on near-zero gradients toward lr (1e-3) per step.
        # Seen: <= 2.5e-5 after 3 steps; tolerance 1e-4 (a tenth of one step's lr).
        assert torch.allclose(b[k], c[k], atol=1e-4, rtol=0), k
    from safetensors.torch import load_file

    init = load_file(str(runs["tmp"] / "world-gemma2" / "model" / "model.safetensors"))
    moved = max((a[k] - init[k].float()).abs().max().item() for k in a if k in init)
    assert moved > 1e-3  # training really changed the weights, so the equality above is not vacuous


def test_export_round_trip_logits(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from fpo_ds import checkpoint

    dump = _dump(runs, "ranks2_micro1")
    tag = runs["tmp"] / "runs" / "r2m1" / "checkpoints" / "step_00000003"
    out = checkpoint.export(tag, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, att, logits = dump["logits"][..., 0].long(), dump["logits"][..., 1].long(), dump["logits"][..., 2:]
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=att).logits
    assert torch.allclose(got, logits, atol=1e-5), (got - logits).abs().max()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(out)  # generation stops at the chat template's end of turn too
    want = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    assert GenerationConfig.from_pretrained(out).eos_token_id == want
    card = (out / "README.md").read_text()  # the model card: method, reference, versions, recipe
    assert "method `dpo`" in card and str(runs["tmp"] / "world-gemma2" / "model") in card
    assert "| deepspeed |" in card and "global_batch_size: 2" in card
    assert "None recorded" in card  # this run had no held-out pairs


def test_model_card_carries_the_held_out_metrics(runs, tmp_path):
    from fpo_ds import checkpoint

    out = checkpoint.export(runs["tmp"] / "runs" / "fpo-eval" / "checkpoints" / "step_00000004", tmp_path / "hf")
    card = (out / "README.md").read_text()
    last = runs["two"]["fpo_eval"]["history"][-1]
    assert "At step 4:" in card and f"| eval_loss | {last['eval_loss']:.6g} |" in card
    assert "SAE: `" in card and "method `fpo`" in card


def test_fpo_step0_is_ln2_with_zero_feature_mse(runs):
    for name in ("fpo", "fpo_ckpt"):
        h0 = runs["two"][name]["history"][0]
        assert abs(h0["loss"] - LN2) < 1e-4, (name, h0)
        # a mean of non-negative per-pair values: ~0 means ~0 for every pair
        assert h0["fpo/feature_mse_chosen"] < 1e-9 and h0["fpo/feature_mse_rejected"] < 1e-9, h0
        assert h0["fpo/sae_comm_bytes_per_step"] > 0
        later = runs["two"][name]["history"][-1]
        assert later["fpo/feature_mse_rejected"] > 0 and math.isfinite(later["loss"])
        assert runs["two"][name]["reference"] == "Reader"
    # activation checkpointing re-runs block L in backward: the tap must not change anything
    assert _losses(runs["two"], "fpo_ckpt") == pytest.approx(_losses(runs["two"], "fpo"), abs=1e-5)


def test_cache_built_on_two_ranks_trains_on_one_and_serves_dpo(runs):
    assert _losses(runs["one"], "fpo_1rank") == pytest.approx(_losses(runs["two"], "fpo"), abs=1e-5)
    assert _losses(runs["two"], "dpo_from_fpo_cache") == pytest.approx(_losses(runs["two"], "gemma2-dpo"), abs=1e-5)
    m = json.loads((runs["tmp"] / "fpo-cache" / "manifest.json").read_text())
    assert m["k_cache"] == 32 and m["fingerprints"]["features"]
    # O(k_cache) per pair: 2 responses x k_cache x (int32 index + f32 value) + small fixed fields
    per_pair = sum(p["bytes"] for p in m["parts"]) / m["n_pairs"]
    assert per_pair < 2 * 32 * 8 + 200


def test_sharded_encoder_matches_sae_lens(runs):
    for rank_res in runs["two"]["sae"]["per_rank"]:
        assert len(rank_res) == 10, rank_res.keys()  # 5 architectures x shard groups none (1) and world (2)
        for name, r in rank_res.items():
            assert r["fwd_err"] <= 1e-5 and r["grad_err"] <= 1e-5 and r["nonzero"] == 1.0, (name, r)
            assert r["n_max_given_equal"], (name, r)
            if r["group_size"] == 2:  # this rank's resident share is half of W_enc and b_enc (+ b_dec)
                assert r["resident_bytes"] <= r["encoder_bytes"] / 2 + 16 * 4 * 2 + 96, (name, r)
                assert r["comm_bytes"] > 0, (name, r)
            else:  # replicated: the whole encoder, no traffic
                assert r["resident_bytes"] >= r["encoder_bytes"] - 16 * 4 and r["comm_bytes"] == 0, (name, r)
    assert runs["two"]["sae"]["bf16_many_rows_err"] <= 1e-6  # row ids exact with bf16 and 300 rows


def _reader(recipe_path, *overrides):
    from fpo_ds import cache, components
    from fpo_ds import config as C

    recipe = C.load(recipe_path, list(overrides))
    tok, _, fingerprint = components.load_data(recipe)
    return cache.Reader(recipe, tok, fingerprint, features=recipe.loss.needs_features)


def test_cache_refuses_wrong_or_damaged(runs, tmp_path):
    import shutil

    recipe, src = runs["fpo_recipe"], runs["tmp"] / "fpo-cache"
    assert len(_reader(recipe).rows) == 32  # world size 1 here: reads every part
    with pytest.raises(ValueError, match="different SAE"):
        _reader(recipe, f"sae.path={runs['tmp'] / 'sae-other'}")
    with pytest.raises(ValueError, match="max lengths"):
        _reader(recipe, "data.max_length=40")
    bad = tmp_path / "cache"
    shutil.copytree(src, bad)
    part = bad / "part-00001-of-00002.safetensors"
    raw = bytearray(part.read_bytes())
    raw[-5] ^= 0xFF
    part.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="part-00001-of-00002.safetensors is truncated or corrupted.*build-cache"):
        _reader(recipe, f"cache.dir={bad}")
    part.write_bytes(bytes(raw[:-100]))
    with pytest.raises(ValueError, match="truncated or corrupted"):
        _reader(recipe, f"cache.dir={bad}")
    part.unlink()
    with pytest.raises(FileNotFoundError, match="part-00001-of-00002.safetensors is missing"):
        _reader(recipe, f"cache.dir={bad}")
