"""The GPU check's training stages: FPO against SimPO under torch.profiler, and the MFU sweep.

    python bench/gpu_steps.py profile --world DIR --out DIR [--dry-run]
    python bench/gpu_steps.py sweep --world DIR --out DIR [--dry-run] [--budget-s S] [--points a,b]

One process, one rank, no launcher (fpo_ds.dist's single-process topology; NCCL on CUDA): every
point builds its engine in this process and tears it down, so a point costs its model load and
its steps, not a launch. The model is Gemma-2-2B's architecture with random weights (no
download), written once in bf16 under --world with the toy tokenizer's digit-repeat pairs of
1024 tokens (prompt 512), a random 16k-feature JumpReLU SAE on block 25 and FPO's offline cache.
--dry-run shrinks it to 2 blocks of width 64 at the toy vocabulary on the CPU: same code path.

No point saves a checkpoint (output.save_every=0, output.save_final=false). Results are appended
as each point finishes (points.jsonl, profile/<method>/ops.json), so a stage stopped by its time
limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny.yaml"  # overridden key by key below, as `fpo-ds bench` does
SHAPE = "google/gemma-2-2b"
DS = {"zero3": "zero3_bf16.json", "auto": "auto"}  # the CPU dry run swaps in zero3_fp32.json
# The profile stage's two points are the committed H200 run's setting: ZeRO-3 bf16, checkpointing, micro 2
# (their timed steps run before the profiler starts, so they are sweep points too: profile-simpo, profile-fpo).
PROFILED = ("zero3", True, 2)
# The sweep's points in priority order (a point past the stage's time budget is skipped):
# name -> (method, deepspeed config, activation checkpointing, micro-batch in pairs)
POINTS = {
    "fpo-auto-ckpt-mb2": ("fpo", "auto", True, 2),  # against profile-fpo: auto (stage 0 on one GPU) vs ZeRO-3
    "fpo-auto-nockpt-mb2": ("fpo", "auto", False, 2),
    "fpo-auto-ckpt-mb4": ("fpo", "auto", True, 4),
    "fpo-auto-ckpt-mb8": ("fpo", "auto", True, 8),
    "fpo-auto-ckpt-mb1": ("fpo", "auto", True, 1),
    "fpo-zero3-ckpt-mb4": ("fpo", "zero3", True, 4),
    "fpo-auto-nockpt-mb4": ("fpo", "auto", False, 4),
    "fpo-zero3-ckpt-mb8": ("fpo", "zero3", True, 8),
    "fpo-auto-nockpt-mb8": ("fpo", "auto", False, 8),
    "fpo-auto-nockpt-mb1": ("fpo", "auto", False, 1),
}
# The CPU dry run: with the profile's ZeRO-3 points, both ZeRO settings, checkpointing on and off, two micro-batches.
DRY_POINTS = ("fpo-auto-ckpt-mb2", "fpo-auto-nockpt-mb1")


class Size:
    """The model, data and step counts of a run: Gemma-2-2B's shape on a GPU, a toy of it on the CPU."""

    def __init__(self, dry: bool):
        self.dry = dry
        self.hidden, self.layers = (64, 2) if dry else (None, None)  # None: the shape's own
        self.seq, self.pairs, self.d_sae = (64, 32, 128) if dry else (1024, 64, 16384)
        self.warmup, self.timed, self.profiled = (1, 2, 1) if dry else (2, 3, 3)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- the world


def ensure_world(world: Path, size: Size) -> Path:
    """Model, pairs, SAE and FPO's cache under `world`, built once (READY.json is written last)."""
    if (world / "READY.json").is_file():
        return world
    shutil.rmtree(world, ignore_errors=True)  # a half-built world from a stopped stage
    t0 = time.perf_counter()
    from fpo_ds.tools.benchmarks import bench
    from fpo_ds.tools.demo import toy

    toy.write_world(world, "gemma2", n_train=size.pairs, n_eval=4)
    rows = bench.long_rows(size.pairs, size.seq, seed=0)
    (world / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    layers = _write_model(world / "model", size)
    toy.random_sae("jumprelu", _hidden(world), size.d_sae, layers - 1, seed=0).save_model(str(world / "sae"))
    from fpo_ds import cache_build
    from fpo_ds import config as C

    cache_build.build(C.load(RECIPE, overrides(world, world / "runs" / "cache", "fpo", "zero3", True, 2, 1, size)))
    (world / "READY.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "layers": layers}))
    return world


def _write_model(path: Path, size: Size) -> int:
    """Gemma-2-2B's architecture, random weights, made on the device and saved in the training dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fpo_ds.tools.benchmarks import bench

    tok = AutoTokenizer.from_pretrained(path)
    cfg = bench.shape_config(SHAPE, tok, size.hidden, size.layers)
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, size.seq)
    if size.dry:
        cfg.vocab_size = len(tok)  # the CPU dry run: the toy vocabulary (the GPU keeps 256k)
    dtype = torch.bfloat16 if device() == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return cfg.num_hidden_layers


def _hidden(world: Path) -> int:
    return json.loads((world / "model" / "config.json").read_text())["hidden_size"]


def overrides(world: Path, run_dir: Path, method: str, ds: str, ckpt: bool, micro: int, steps: int, size) -> list:
    ds_path = DS[ds] if device() == "cuda" else {"zero3": "zero3_fp32.json", "auto": "auto"}[ds]
    values = {
        "model.name_or_path": world / "model",
        "model.attn_implementation": "eager",  # the 2B recipe's (Gemma-2 soft-caps attention logits)
        "model.gradient_checkpointing": ckpt,
        "data.path": world / "data/train.jsonl",
        "data.max_length": size.seq,
        "data.max_prompt_length": size.seq // 2,
        "loss.method": method,
        "sae.path": world / "sae",
        "sae.k": 50,
        "cache.dir": world / "cache",
        "train.micro_batch_size": micro,
        "train.global_batch_size": micro,  # one rank, no accumulation: a step is one micro-batch
        "train.max_steps": steps,
        "train.warmup_steps": 1,
        "train.lr": 1e-6,
        "deepspeed.config": ds_path if ds_path == "auto" else ROOT / "ds_configs" / ds_path,
        "output.dir": run_dir,
        "output.save_every": 0,
        "output.save_final": False,  # a 2.6B model's ZeRO-3 checkpoint is ~25 GB: a check saves none
        "logging.progress_bar": False,
        "logging.every": 10**6,
    }
    return [f"{k}={v}" for k, v in values.items()]


# ----------------------------------------------------------------------------- one point


def _labelled(name: str, fn):
    """`fn` inside a torch.profiler.record_function span (free when no profiler runs)."""

    def call(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    return call


def instrument(c):
    """Named spans for the parts FPO adds: the block-L tap's hook, the SAE read, the cache read; and the loss."""
    from fpo_ds import model as M

    reference = _labelled("fpo:cache_read", c.reference) if c.objective.ref_kind == "offline" else c.reference
    if c.features is not None:
        f = c.features
        f.read = _labelled("fpo:sae_read", f.read)
        f.tap.handle.remove()
        block = M.decoder_layers(c.policy.module)[f.tap.layer]
        f.tap.handle = block.register_forward_hook(_labelled("fpo:tap_hook", f.tap._hook))
    objective = c.objective._replace(fn=_labelled("step:loss", c.objective.fn))
    return dataclasses.replace(c, objective=objective, reference=reference)


def _widest(c, step: int, lengths: list[int]) -> int:
    """The widest padded micro-batch of this step (what the planner's memory estimate needs)."""
    from fpo_ds import data, dist

    t = c.recipe.train
    plan = data.micro_batches(
        len(c.pairs), c.recipe.data.seed, step, t.global_batch_size, t.micro_batch_size, dist.world_size(), lengths
    )
    return max(lengths[j] for positions in plan for j in positions[dist.rank()])


def run_point(
    world: Path,
    run_dir: Path,
    method: str,
    ds: str,
    ckpt: bool,
    micro: int,
    size: Size,
    profile_dir: Path | None = None,
) -> dict:
    """One setting: build, `warmup` steps, `timed` steps (synchronised wall time each), torn down after.

    With `profile_dir`, then `profiled` steps under torch.profiler (trace and op table written there).
    """
    from fpo_ds import components, dist, train
    from fpo_ds import config as C

    steps = size.warmup + size.timed + (size.profiled if profile_dir else 0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    recipe = C.load(RECIPE, overrides(world, run_dir, method, ds, ckpt, micro, steps, size))
    dist.init(recipe.deepspeed.timeout_minutes)  # the entry point's job (a no-op once up)
    c = instrument(components.build(recipe, "train"))
    build_s = time.perf_counter() - t0
    from fpo_ds import data

    lengths = [data.padded_length(p) for p in c.pairs]
    out = {"method": method, "ds": ds, "checkpointing": ckpt, "micro": micro, "build_s": build_s}
    out["zero_stage"] = c.ds_cfg.get("zero_optimization", {}).get("stage", 0)
    out["dtype"] = "bf16" if c.ds_cfg.get("bf16", {}).get("enabled") else "fp32"
    times, tokens, widths, records = [], [], [], []
    try:
        for step in range(size.warmup + size.timed):
            widths.append(_widest(c, step, lengths))
            t1 = time.perf_counter()
            m = train.train_step(c, step, lengths).metrics
            sync()
            times.append(time.perf_counter() - t1)
            tokens.append(m["step_tokens"])
            records.append(m)
        if profile_dir is not None:
            out["profile"] = _profile(c, lengths, size, profile_dir)
    finally:
        _teardown(c)
    timed = slice(size.warmup, None)
    out.update(
        step_time_s=times[timed],
        step_s=statistics.median(times[timed]),
        tokens_per_step=statistics.median(tokens[timed]),
        tokens_per_s=statistics.median(t / s for t, s in zip(tokens[timed], times[timed])),
        widest=max(widths),
        peak_mem_mib=_peak_mib(records),
        sae_encode_s=statistics.median(r.get("time/sae_encode_s", 0.0) for r in records[timed]),
        cache_read_s=statistics.median(r.get("time/cache_read_s", 0.0) for r in records[timed]),
    )
    return out


def _peak_mib(records: list[dict]) -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return max(r["peak_mem_mib"] for r in records)  # the CPU's: the process's peak RSS


def _profile(c, lengths: list[int], size: Size, out: Path) -> dict:
    """`profiled` steps under torch.profiler: the trace (trace.json.gz) and every op's times (ops.json)."""
    from torch.profiler import ProfilerActivity, profile

    from fpo_ds import train

    out.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    first, walls = size.warmup + size.timed, []
    with profile(activities=acts) as prof:
        for step in range(first, first + size.profiled):
            t0 = time.perf_counter()
            train.train_step(c, step, lengths)
            sync()
            walls.append(time.perf_counter() - t0)
    prof.export_chrome_trace(str(out / "trace.json.gz"))
    ops = [_op_row(e) for e in prof.key_averages()]
    ops.sort(key=lambda r: (r["self_device_us"], r["self_cpu_us"]), reverse=True)
    record = {"steps": size.profiled, "wall_s": walls, "device": device(), "ops": ops}
    (out / "ops.json").write_text(json.dumps(record, indent=0))
    return {"steps": size.profiled, "wall_s": walls, "ops_file": str(out / "ops.json")}


def _op_row(e) -> dict:
    """One profiler average: times in microseconds over all profiled steps; `kernel` for device-side events."""
    get = lambda *names: next((float(getattr(e, n)) for n in names if hasattr(e, n)), 0.0)  # noqa: E731
    kind = str(getattr(e, "device_type", "")).rsplit(".", 1)[-1]
    return {
        "name": e.key,
        "count": int(e.count),
        "kernel": kind == "CUDA",
        "self_device_us": get("self_device_time_total", "self_cuda_time_total"),
        "device_us": get("device_time_total", "cuda_time_total"),
        "self_cpu_us": get("self_cpu_time_total"),
        "cpu_us": get("cpu_time_total"),
    }


def _teardown(c) -> None:
    """Free the point's engine and caches before the next point builds its own."""
    if c.features is not None:
        c.features.close()
    c.policy.destroy()
    del c
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the stages


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _failure(e: BaseException) -> dict:
    oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
    return {"status": "oom" if oom else "error", "error": f"{type(e).__name__}: {str(e)[:600]}"}


def profile_stage(world: Path, out: Path, size: Size) -> None:
    """SimPO, then FPO, at the committed H200 run's setting (PROFILED)."""
    import gpu_report

    from fpo_ds.tools.planner import shapes

    out.mkdir(parents=True, exist_ok=True)
    ensure_world(world, size)
    shape = shapes.model_shape(str(world / "model"))
    ds, ckpt, micro = PROFILED
    for method in ("simpo", "fpo"):
        t0 = time.perf_counter()
        base = {"point": f"profile-{method}", "method": method, "ds": ds, "checkpointing": ckpt, "micro": micro}
        try:
            rec = {
                **base,
                **run_point(world, world / "runs" / base["point"], method, ds, ckpt, micro, size, out / method),
            }
            rec.update(gpu_report.mfu(shape, rec), status="ok")
        except Exception as e:  # noqa: BLE001 - recorded, and the other method still runs
            traceback.print_exc()
            rec = {**base, **_failure(e)}
        rec["seconds"] = time.perf_counter() - t0
        _append(out / "points.jsonl", rec)
        print(f"[profile] {method}: {json.dumps({k: v for k, v in rec.items() if k != 'profile'})}", flush=True)


def sweep_stage(world: Path, out: Path, size: Size, names: list[str], budget_s: float) -> None:
    """The points in order; after an out-of-memory, larger micro-batches of that setting are skipped.

    A point is started only if the last point's time (x 1.3) still fits in `budget_s`.
    """
    import gpu_report

    from fpo_ds.tools.planner import shapes

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ensure_world(world, size)
    shape = shapes.model_shape(str(world / "model"))
    oom, last = set(), 0.0
    for name in names:
        method, ds, ckpt, micro = POINTS[name]
        base = {"point": name, "method": method, "ds": ds, "checkpointing": ckpt, "micro": micro}
        left = budget_s - (time.perf_counter() - start)
        if any(s == (method, ds, ckpt) and m < micro for s, m in oom):
            rec = {**base, "status": "skipped", "error": "a smaller micro-batch of this setting ran out of memory"}
        elif left < 1.3 * last:
            rec = {**base, "status": "skipped", "error": f"time budget: {left:.0f} s left, last point took {last:.0f}"}
        else:
            t0 = time.perf_counter()
            try:
                rec = {**base, **run_point(world, world / "runs" / name, method, ds, ckpt, micro, size), "status": "ok"}
                rec.update(gpu_report.mfu(shape, rec))
            except Exception as e:  # noqa: BLE001 - recorded; the sweep goes on
                traceback.print_exc()
                rec = {**base, **_failure(e)}
                if rec["status"] == "oom":
                    oom.add(((method, ds, ckpt), micro))
            gc.collect()  # the failed point's engine, held by its traceback until here
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            last = rec["seconds"] = time.perf_counter() - t0
        _append(out / "points.jsonl", rec)
        print(f"[sweep] {name}: {json.dumps(rec)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["world", "profile", "sweep"])
    p.add_argument("--world", required=True, help="model, data, SAE and cache (built once, shared by the stages)")
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true", help="toy size on the CPU")
    p.add_argument("--budget-s", type=float, default=210.0, help="sweep: start no point past this many seconds")
    p.add_argument("--points", help=f"sweep: comma-separated subset of {list(POINTS)}")
    args = p.parse_args(argv)
    size = Size(args.dry_run)
    from fpo_ds import components

    components.import_sae_lens()  # before any zero.Init in this process
    if args.stage == "world":
        print(json.loads((ensure_world(Path(args.world), size) / "READY.json").read_text()))
    elif args.stage == "profile":
        profile_stage(Path(args.world), Path(args.out), size)
    else:
        names = args.points.split(",") if args.points else list(DRY_POINTS if args.dry_run else POINTS)
        unknown = [n for n in names if n not in POINTS]
        if unknown:
            p.error(f"--points: unknown {unknown}; choose from {list(POINTS)}")
        sweep_stage(Path(args.world), Path(args.out), size, names, args.budget_s)
    from fpo_ds import dist

    dist.shutdown(0)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
