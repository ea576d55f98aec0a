"""Time and peak memory of one SAE encode + mean-pool, forward and backward, single process.

Compares the trainer's encoder (`ShardedEncoder.pooled`: chunked, backward from the bits of
which features fired) with plain autograd through sae-lens's own `encode`. Each variant runs in
a fresh process so its peak RSS growth is its own.
    python bench/encode_probe.py [--tokens 3072] [--d-in 1024] [--d-sae 16384] [--arch jumprelu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(variant: str, args) -> dict:
    import torch

    from fpo_ds import losses
    from fpo_ds.encoder import ShardedEncoder
    from fpo_ds.tools.demo import toy

    torch.set_num_threads(1)
    sae = toy.random_sae(args.arch, args.d_in, args.d_sae, 0, seed=0, **({"k": 64} if args.arch == "topk" else {}))
    enc = ShardedEncoder(sae, 0, 1)
    rows = 16
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, args.tokens // rows, args.d_in, generator=g, requires_grad=True)
    mask = torch.ones(rows, args.tokens // rows, dtype=torch.bool)
    w = torch.randn(rows, args.d_sae, generator=g)
    base, times = _rss_mib(), []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        feats = enc.pooled(h, mask) if variant == "trainer" else losses.masked_mean(sae.encode(h), mask)
        (feats * w).sum().backward()
        times.append(time.perf_counter() - t0)
        h.grad = None
    return {"variant": variant, "seconds": sorted(times)[len(times) // 2], "peak_growth_mib": _rss_mib() - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=3072)
    p.add_argument("--d-in", type=int, default=1024)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--arch", default="jumprelu", choices=["standard", "jumprelu", "topk"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(one(args.variant, args)))
        return
    res = []
    for v in ("sae-lens", "trainer"):
        cmd = [sys.executable, __file__, "--variant", v] + sys.argv[1:]
        res.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
    a, b = res
    print(json.dumps(res))
    print(
        f"{args.tokens} tokens x {args.d_sae} features ({args.arch}): trainer/sae-lens time "
        f"{b['seconds'] / a['seconds']:.3f}, peak growth {b['peak_growth_mib']:.0f} vs {a['peak_growth_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
