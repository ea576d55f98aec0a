"""Start-up (tokenisation) and padding on UltraFeedback-shaped data, before and after.

    python bench/startup.py --out runs/startup [--pairs 60000] [--nproc 2]

Writes a synthetic preference set whose token lengths follow UltraFeedback-binarized's shape
(log-normal prompts and responses, long tails cut by max_length 1024 / prompt 512) and a
byte-level BPE tokenizer trained on it, then measures on `nproc` ranks (one torchrun launch each):
  before  every rank tokenises the whole split itself, serially (data.build_pairs)
  cold    rank 0 tokenises once with one process per core, the others wait and load
  warm    a second run finds the tokenised set and only loads it
and the padding fraction of the gemma-2-2b and gemma-2-9b recipes' micro-batches (8 ranks),
in source order vs grouped by length. Prints a markdown table and writes startup.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the a of to and in is that for it as with was on be by this are or from at which an have not but".split()


def _text(rng: random.Random, median_tokens: float, sigma: float) -> str:
    n = max(1, int(math.exp(rng.gauss(math.log(median_tokens), sigma))))
    return " ".join(rng.choice(WORDS) + rng.choice(["", "s", "ed", "ing"]) for _ in range(n))


def write_set(out: Path, n: int, seed: int = 0) -> Path:
    """UltraFeedback-like lengths: prompt median ~90 words, responses ~180 with a long tail."""
    from fpo_ds.tools.demo import toy

    rng = random.Random(seed)
    rows = [
        {"prompt": _text(rng, 90, 0.9), "chosen": _text(rng, 180, 0.8), "rejected": _text(rng, 160, 0.9)}
        for _ in range(n)
    ]
    (out / "data").mkdir(parents=True, exist_ok=True)
    with open(out / "data" / "train.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tok = toy.build_tokenizer([r[k] for r in rows[:2000] for k in ("prompt", "chosen")], vocab_size=512)
    tok.save_pretrained(out / "tok")
    toy.tiny_config("llama", len(tok), tok).save_pretrained(out / "tok")  # a model directory needs a config
    return out


def _recipe(out):
    from fpo_ds import config as C

    data = {"path": f"{out}/data/train.jsonl"}
    return C.from_dict({"model": {"name_or_path": f"{out}/tok"}, "data": data, "loss": {"method": "simpo"}})


def rank_main(mode: str, out: str) -> None:
    """One rank: the data set-up of a run, timed (run under torchrun)."""
    from fpo_ds import components, data, dist
    from fpo_ds import model as M

    dist.init(30)
    recipe = _recipe(out)
    t0 = time.perf_counter()
    if mode == "before":
        tok = M.load_tokenizer(recipe.model.name_or_path)
        pairs, _ = data.build_pairs(data.select_rows(recipe.data), tok, 1024, 512, "drop", "bench")
    else:
        _, pairs, _ = components.load_data(recipe)
    seconds = time.perf_counter() - t0
    times = [None] * dist.world_size()
    import torch.distributed as tdist

    tdist.all_gather_object(times, seconds)
    if dist.rank() == 0:
        Path(out, f"{mode}.json").write_text(json.dumps({"seconds": max(times), "pairs": len(pairs)}))
    dist.shutdown(0)


def padding(out: Path) -> dict:
    from fpo_ds import components, data

    recipe = _recipe(out)
    _, pairs, _ = components.load_data(recipe)
    lengths = [data.padded_length(p) for p in pairs]
    res = {}
    for name, micro, world in (("gemma-2-2b: micro 2, 8 ranks", 2, 8), ("gemma-2-9b: micro 1, 8 ranks", 1, 8),
                               ("micro 4, 2 ranks", 4, 2)):
        steps = range(min(200, len(pairs) // 32))
        plain = [data.micro_batches(len(pairs), 0, s, 32, micro, world) for s in steps]
        grouped = [data.micro_batches(len(pairs), 0, s, 32, micro, world, lengths) for s in steps]
        res[name] = (data.padding_fraction(pairs, plain), data.padding_fraction(pairs, grouped))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/startup")
    p.add_argument("--pairs", type=int, default=60000)
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args()
    from fpo_ds import pipeline

    out = Path(args.out).resolve()
    write_set(out, args.pairs)
    os.environ["HF_DATASETS_CACHE"] = str(out / "datasets-cache")  # this process reads the same set (padding)
    env = pipeline.child_env()
    res = {}
    for mode in ("before", "cold", "warm"):
        t0 = time.perf_counter()
        pipeline.torchrun([__file__, "--rank-main", mode, str(out)], args.nproc, env=env, cwd=ROOT, quiet=True)
        res[mode] = {**json.loads((out / f"{mode}.json").read_text()), "launch_s": time.perf_counter() - t0}
    pad = padding(out)
    lines = [f"{args.pairs} pairs, {args.nproc} ranks", "| mode | data set-up (s, slowest rank) | launch (s) |"]
    lines += ["|---|---|---|"]
    lines += [f"| {m} | {r['seconds']:.1f} | {r['launch_s']:.1f} |" for m, r in res.items()]
    lines += ["", "| global batch 32 | padding, source order | padding, grouped by length |"]
    lines += ["|---|---|---|"]
    lines += [f"| {k} | {a:.3f} | {b:.3f} |" for k, (a, b) in pad.items()]
    print("\n".join(lines))
    (out / "startup.json").write_text(json.dumps({"setup": res, "padding": pad}, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank-main"]:
        rank_main(sys.argv[2], sys.argv[3])
    else:
        main()
