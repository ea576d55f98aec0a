"""Compare `fpo-ds plan`'s per-GPU estimate with the peaks a GPU bench run measured.

    python bench/calibrate_plan.py runs/bench-gpu/bench.json

Rebuilds the bench's data (deterministic), finds the widest padded micro-batch the timed steps
saw, and runs the planner's estimate for each method at that width. Prints estimate, measured
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
from fpo_ds.tools import plan, toy

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


def main(path: str) -> None:
    res = read_bench(path)
    cfg = res["config"]
    with tempfile.TemporaryDirectory() as tmp:
        world = toy.write_world(Path(tmp) / "w", "llama", n_train=2048, n_eval=8)  # same tokenizer and data
        tok = M.load_tokenizer(str(world / "model"))
        pairs, _ = data.load_pairs(
            C.DataConfig(path=str(world / "data/train.jsonl"), max_length=64, max_prompt_length=32), tok
        )
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                toy.tiny_config("llama", len(tok), tok, cfg["hidden"], cfg["layers"])
            )
    g = cfg["micro"] * cfg["nproc"]
    width = max(
        max(
            len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids))
            for i in data.step_indices(len(pairs), 0, s, g, 0, cfg["nproc"])
        )
        for s in range(cfg["steps"])
    )
    nums = {
        "params": sum(p.numel() for p in model.parameters()),
        "hidden": cfg["hidden"],
        "layers": cfg["layers"],
        "vocab": model.config.vocab_size,
        "largest_layer": max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
    }
    print(f"{nums['params'] / 1e6:.1f}M params, widest padded micro-batch {width} tokens x {2 * cfg['micro']} seqs")
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
            "model": {"name_or_path": "x"},
            "data": {"path": "x", "max_length": width, "max_prompt_length": 1},
            "loss": {"method": method, "reference": ref},
            "sae": {"path": "x"},
            "cache": {"dir": "x"},
            "train": {"micro_batch_size": cfg["micro"], "global_batch_size": g},
        }
        items = plan.estimate(C.from_dict(raw), nums, 1, cfg["nproc"], cfg["d_sae"])
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
