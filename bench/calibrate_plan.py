"""Compare `fpo-ds plan`'s per-GPU estimate with the peaks a GPU bench run measured.

    python bench/calibrate_plan.py runs/bench-gpu/bench.json

Rebuilds the bench's data (deterministic; the long pairs of --seq when the bench used them),
finds the widest padded micro-batch the timed steps saw, and runs the planner's estimate for each
method at that width, with the bench's model (a shipped shape's facts for --shape, else the toy
Llama at --hidden x --layers) and activation checkpointing as benched. Prints estimate, measured
CUDA peak and relative error.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from fpo_ds import config as C
from fpo_ds import data
from fpo_ds import model as M
from fpo_ds.tools.benchmarks import bench
from fpo_ds.tools.demo import toy
from fpo_ds.tools.planner import memory, shapes

CONFIG_KEYS = ("hidden", "layers", "micro", "nproc", "steps", "d_sae")
FIX = "pass the bench.json that `bash bench/gpu.sh` (or `fpo-ds bench --out DIR`) wrote, e.g. runs/bench-gpu/bench.json"


def read_bench(path: str) -> dict:
    """A bench run's results; a missing, unreadable or foreign file exits with one paragraph naming it and the fix."""
    p = Path(path)
    try:
        res = json.loads(p.read_text())
    except FileNotFoundError:
        raise SystemExit(f"calibrate_plan: {p} does not exist; {FIX}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"calibrate_plan: cannot read {p} ({e}); {FIX}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"calibrate_plan: {p} is not valid JSON (line {e.lineno}: {e.msg}); {FIX}") from None
    cfg = res.get("config") if isinstance(res, dict) else None
    missing = [k for k in CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing or not isinstance(res.get("methods"), dict):
        what = f"config keys {missing}" if missing else "the methods table"
        raise SystemExit(f"calibrate_plan: {p} is not a bench result (no {what}); {FIX}")
    return res


def _pairs(cfg: dict, tmp: Path) -> tuple[list, object]:
    """The bench's pairs and tokenizer: the toy world, with the bench's long rows when it ran --seq > 64."""
    seq = cfg.get("seq", 64)
    world = toy.write_world(tmp / "w", "llama", n_train=cfg.get("pairs", 2048), n_eval=8)
    if seq > 64:
        rows = bench.long_rows(cfg["pairs"], seq, seed=0)
        (world / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = M.load_tokenizer(str(world / "model"))
    data_cfg = C.DataConfig(path=str(world / "data/train.jsonl"), max_length=seq, max_prompt_length=seq // 2)
    return data.load_pairs(data_cfg, tok)[0], tok


def _model_numbers(cfg: dict, tok) -> dict:
    """What the planner needs of the benched model: a shipped shape's facts, or the toy Llama's."""
    keys = ("params", "hidden", "layers", "vocab", "largest_layer")
    if cfg.get("shape"):
        shape = shapes.model_shape(cfg["shape"])
        return {k: getattr(shape, k) for k in keys}
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(toy.tiny_config("llama", len(tok), tok, cfg["hidden"], cfg["layers"]))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "hidden": cfg["hidden"],
        "layers": cfg["layers"],
        "vocab": model.config.vocab_size,
        "largest_layer": max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
    }


def main(path: str) -> None:
    res = read_bench(path)
    cfg = res["config"]
    with tempfile.TemporaryDirectory() as tmp:
        pairs, tok = _pairs(cfg, Path(tmp))
        nums = _model_numbers(cfg, tok)
    g = cfg["micro"] * cfg["nproc"]
    width = max(
        max(
            len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids))
            for i in data.step_indices(len(pairs), 0, s, g, 0, cfg["nproc"])
        )
        for s in range(cfg["steps"])
    )
    ckpt = bool(cfg.get("checkpointing"))
    print(
        f"{cfg.get('shape') or 'toy llama'}: {nums['params'] / 1e6:.1f}M params, widest padded micro-batch {width} "
        f"tokens x {2 * cfg['micro']} seqs, activation checkpointing {ckpt}"
    )
    print("| method | plan estimate (MiB) | measured peak (MiB) | error |\n|---|---|---|---|")
    methods = {
        "sft": ("sft", "live"),
        "simpo": ("simpo", "live"),
        "dpo_live": ("dpo", "live"),
        "dpo_cache": ("dpo", "offline"),
        "tdpo2": ("tdpo2", "live"),
        "fpo": ("fpo", "offline"),
    }
    for name, (method, ref) in methods.items():
        if name not in res["methods"]:
            continue  # a `--methods` subset run
        raw = {
            "model": {"name_or_path": "x", "gradient_checkpointing": ckpt},
            "data": {"path": "x", "max_length": width, "max_prompt_length": 1},
            "loss": {"method": method, "reference": ref},
            "sae": {"path": "x"},
            "cache": {"dir": "x"},
            "train": {"micro_batch_size": cfg["micro"], "global_batch_size": g},
        }
        items = memory.estimate(C.from_dict(raw), nums, 1, cfg["nproc"], cfg["d_sae"])
        est = sum(v for k, v in items.items() if not k.startswith("host")) / 2**20
        measured = statistics_median(res["methods"][name]["peak_mem_mib"])
        print(f"| {name} | {est:.0f} | {measured:.0f} | {100 * (est - measured) / measured:+.1f}% |")


def statistics_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", help="bench.json of a GPU bench run (bash bench/gpu.sh)")
    main(parser.parse_args().bench_json)
