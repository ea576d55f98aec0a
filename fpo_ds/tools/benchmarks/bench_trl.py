"""`fpo-ds bench --against trl`: fpo-ds's DPO against TRL's DPOTrainer, same model, rows, batches and settings.

    fpo-ds bench --against trl                       # the full table: 2 models x 1 and 2 CPU processes, 6 repeats
    fpo-ds bench --against trl --repeats 2 --with-auto
    fpo-ds bench --against trl --lora 16 --variant auto --out bench/results/cpu-vs-trl-lora   # LoRA vs TRL + PEFT

DPO, fp32, beta 0.1, lr 1e-4 constant, gradient clipping 1.0, live reference, micro-batch 4 per
process and no accumulation, on toy Llama models written locally. Each fpo-ds variant is a
`deepspeed.config` value (default: zero3_fp32 and zero2_fp32; `--with-auto` adds `auto`). Both
libraries run under torchrun (TRL's Trainer runs DDP with gloo on CPU under it), fed the same rows in
the order fpo-ds consumes them (TRL's sampler is sequential; the settings are
fpo_ds/tools/benchmarks/trl_run.py's, which tests/test_trl_parity.py checks step by step). Within each repeat
the runs alternate (every variant, then TRL), so machine noise hits all of them alike.

Measured for every launch, the same way for both libraries:
  * step time: the median over the steps after --warmup of each trainer's own step clock (fpo-ds's
    `step_time_s`; TRL: on_step_begin to on_step_end), forward, reference forward, backward and
    optimizer step;
  * peak RSS per rank: the largest VmHWM (the kernel's resident-set high-water mark) among the
    launcher's child processes (its ranks), read when the last step's record appears, so
    fpo-ds's final checkpoint, which TRL is not asked to write, is not counted;
  * launch -> step 1: from starting torchrun to step 1's record appearing in the run's metrics file
    (both write it when the step ends; polled every 20 ms).
Writes OUT.json and OUT.md (ratios fpo-ds / TRL, median [min, max] over repeats, and the command).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fpo_ds import pipeline, zero_auto
from fpo_ds.tools.benchmarks import trl_run
from fpo_ds.tools.demo import toy

MODELS = {"tiny": (64, 4), "h256x8": (256, 8)}  # toy Llama: hidden size, layers
VARIANTS = ["ds_configs/zero3_fp32.json", "ds_configs/zero2_fp32.json"]
ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "recipes" / "tiny.yaml"
POLL_S = 0.02
MAX_LENGTH, MAX_PROMPT = 64, 32


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fpo-ds bench --against trl", description=__doc__.splitlines()[0])
    p.add_argument("--against", choices=["trl"], default="trl")
    p.add_argument("--out", default="bench/results/cpu-vs-trl", help="writes OUT.json and OUT.md")
    p.add_argument("--work", default="runs/bench-trl", help="worlds and run directories")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the step-time median")
    p.add_argument("--micro", type=int, default=4, help="pairs per process per step")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    p.add_argument("--nprocs", default="1,2", help="process counts, comma-separated")
    p.add_argument(
        "--variant",
        action="append",
        help="a deepspeed.config value for fpo-ds (repeat); default: " + ", ".join(VARIANTS),
    )
    p.add_argument("--with-auto", action="store_true", help="also deepspeed.config=auto")
    p.add_argument(
        "--lora",
        type=int,
        default=0,
        metavar="R",
        help="LoRA of rank R on every linear layer (fpo-ds model.lora; TRL: the same PEFT LoraConfig, no ref_model)",
    )
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    unknown = set(args.models) - set(MODELS)
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; choose from {list(MODELS)}")
    args.nprocs = [int(n) for n in args.nprocs.split(",")]
    args.variants = (args.variant or list(VARIANTS)) + (["auto"] if args.with_auto else [])
    if args.warmup >= args.steps:
        p.error(f"--warmup {args.warmup} leaves no steady-state steps of --steps {args.steps}")
    return args


def label(variant: str) -> str:
    """A variant's short name: the DeepSpeed JSON's stem (zero3_fp32), or the value itself (auto)."""
    return Path(variant).stem


# ----------------------------------------------------------------------------- launches


def _ranks(pid: int) -> list[int]:
    """The live child processes of the launcher `pid` (torchrun's ranks), from /proc/PID/task/*/children.

    Only direct children: a rank's own subprocesses (a compiler building a DeepSpeed op) are not ranks.
    """
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _hwm_mib(pid: int) -> float | None:
    """A process's peak resident set size so far (VmHWM), MiB; None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _records(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def measure(cmd: list[str], env: dict, metrics: Path, steps: int, log: Path) -> dict:
    """Launch `cmd`; launch -> step 1 time and the ranks' peak RSS, read as described in the module docstring."""
    metrics.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        first, hwm = None, {}
        while proc.poll() is None:
            for pid in _ranks(proc.pid):
                hwm[pid] = _hwm_mib(pid) or hwm.get(pid, 0.0)
            n = _records(metrics)
            if first is None and n >= 1:
                first = time.perf_counter() - t0
            if n >= steps:
                break
            time.sleep(POLL_S)
        code = proc.wait()
    if code or first is None:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {code}:\n{log.read_text()[-4000:]}")
    return {"launch_to_step1_s": first, "peak_rss_mib": max(hwm.values())}


def _env() -> dict:
    env = pipeline.child_env(DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), TOKENIZERS_PARALLELISM="false")
    from fpo_ds import dist

    dist.use_extensions_dir(env)
    return env


def fpo_ds_overrides(world: Path, run_dir: Path, variant: str, args, nproc: int) -> list[str]:
    """The recipe overrides of one fpo-ds run (recipes/tiny.yaml underneath)."""
    o = {
        "model.name_or_path": world / "model",
        "data.path": world / "data" / "train.jsonl",
        "data.max_length": MAX_LENGTH,
        "data.max_prompt_length": MAX_PROMPT,
        "loss.method": "dpo",
        "loss.beta": 0.1,
        "loss.reference": "live",
        "train.micro_batch_size": args.micro,
        "train.global_batch_size": args.micro * nproc,
        "train.max_steps": args.steps,
        "train.warmup_steps": 0,
        "train.schedule": "constant",
        "train.lr": 1e-4,
        "deepspeed.config": variant,
        "output.dir": run_dir,
        "output.save_every": 0,
        "logging.progress_bar": False,
        "logging.every": 10**6,
    }
    if args.lora:
        o |= {f"model.lora.{k}": v for k, v in lora_block(args.lora).items()}
    return [f"{k}={v}" for k, v in o.items()]


def lora_block(r: int) -> dict:
    """The model.lora block both libraries train with (TRL through the same PEFT LoraConfig)."""
    return {"r": r, "alpha": 2.0 * r, "dropout": 0.0, "target_modules": "all-linear"}


def run_fpo_ds(world: Path, work: Path, variant: str, args, nproc: int, tag: str) -> dict:
    run_dir = work / "runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    plan = work / f"plan-{tag}.json"
    stage = {
        "stage": "train",
        "recipe": str(RECIPE),
        "overrides": fpo_ds_overrides(world, run_dir, variant, args, nproc),
    }
    plan.write_text(json.dumps([stage]))
    cmd = pipeline.torchrun_cmd(nproc, _port()) + ["-m", "fpo_ds.pipeline", str(plan)]
    res = measure(cmd, _env(), run_dir / "metrics.jsonl", args.steps, work / f"log-{tag}.txt")
    return res | _steady(run_dir / "metrics.jsonl", args.warmup)


def run_trl(world: Path, work: Path, args, nproc: int, tag: str, rows: list[dict]) -> dict:
    out = work / "runs" / tag
    run = {"name": "dpo", "method": "dpo", "beta": 0.1, "lr": 1e-4, "steps": args.steps, "batch": args.micro}
    if args.lora:
        run["lora"] = lora_block(args.lora)
    spec = {"model": str(world / "model"), "out": str(out), "max_length": MAX_LENGTH, "rows": rows, "runs": [run]}
    path = work / f"spec-{tag}.json"
    path.write_text(json.dumps(spec))
    cmd = pipeline.torchrun_cmd(nproc, _port()) + ["-m", "fpo_ds.tools.benchmarks.trl_run", str(path)]
    res = measure(cmd, _env(), out / "dpo" / "metrics.jsonl", args.steps, work / f"log-{tag}.txt")
    return res | _steady(out / "dpo" / "metrics.jsonl", args.warmup)


def _port() -> int:
    """A port free now (the kernel picks it): fixed ranges collide with other jobs' launches on the machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steady(metrics: Path, warmup: int) -> dict:
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    return {
        "step_time_s": statistics.median(r["step_time_s"] for r in recs[warmup:]),
        "rank0_peak_mem_mib": recs[-1]["peak_mem_mib"],  # the trainer's own figure (rank 0), for reference
        "losses": [r["loss"] for r in recs],
    }


# ----------------------------------------------------------------------------- data


def world(work: Path, name: str, pairs: int) -> Path:
    """The toy world of model `name` (written once): tokenizer, Llama of MODELS[name], `pairs` training rows."""
    path = work / f"world-{name}"
    if not (path / "model" / "config.json").is_file():
        hidden, layers = MODELS[name]
        toy.write_world(path, "llama", n_train=pairs, n_eval=8, hidden=hidden, layers=layers)
    return path


def trl_rows(world: Path, args, nproc: int) -> tuple[list[dict], list[dict]]:
    """The rows in the order fpo-ds's sampler gives them to `nproc` ranks, and their fpo-ds token ids."""
    from fpo_ds import config as C
    from fpo_ds import data
    from fpo_ds import model as M

    recipe = C.load(RECIPE, fpo_ds_overrides(world, Path("unused"), VARIANTS[0], args, nproc))
    pairs, _ = data.load_pairs(recipe.data, M.load_tokenizer(recipe.model.name_or_path))
    order = trl_run.fpo_ds_order(pairs, recipe.data.seed, args.steps, args.micro, nproc)
    rows = [json.loads(x) for x in Path(recipe.data.path).read_text().splitlines()]
    return [rows[pairs[j].example_id] for j in order], [trl_run.token_ids(pairs[j]) for j in order]


# ----------------------------------------------------------------------------- the table


def run(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    result = {"command": args.command, "config": _config(args), "cells": []}
    for name in args.models:
        w = world(work, name, pairs=max(args.nprocs) * args.micro * args.steps)
        for nproc in args.nprocs:
            rows, tokens = trl_rows(w, args, nproc)
            cell = {"model": name, "params": zero_auto.saved_params(w / "model"), "procs": nproc, "runs": {}}
            cell["runs"] = {label(v): [] for v in args.variants} | {"trl": []}
            for r in range(args.repeats):
                for v in args.variants:
                    tag = f"{name}-p{nproc}-{label(v)}-r{r}"
                    cell["runs"][label(v)].append(run_fpo_ds(w, work, v, args, nproc, tag))
                    _say(tag, cell["runs"][label(v)][-1])
                tag = f"{name}-p{nproc}-trl-r{r}"
                cell["runs"]["trl"].append(run_trl(w, work, args, nproc, tag, rows))
                _say(tag, cell["runs"]["trl"][-1])
                if r == 0:  # the token ids TRL trained on, against fpo-ds's
                    got = json.loads((work / "runs" / tag / "dpo" / "tokens.json").read_text())
                    cell["same_token_ids"] = got == tokens
            result["cells"].append(cell)
            _write(result, Path(args.out))  # after every cell: a late failure keeps what was measured
    return result


def _write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))


def _config(args) -> dict:
    import trl

    keys = ("repeats", "steps", "warmup", "micro", "models", "nprocs", "variants", "lora")
    return {k: getattr(args, k) for k in keys} | {"trl": trl.__version__, "max_length": MAX_LENGTH}


def _say(tag: str, res: dict) -> None:
    brief = {k: round(v, 4) for k, v in res.items() if k != "losses"}
    print(f"[bench --against trl] {tag}: {brief}", flush=True)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def ratios(cell: dict, variant: str, key: str) -> list[float]:
    """fpo-ds `variant` / TRL for `key`, repeat by repeat (runs of one repeat ran back to back)."""
    return [a[key] / b[key] for a, b in zip(cell["runs"][variant], cell["runs"]["trl"])]


def markdown(result: dict) -> str:
    cfg = result["config"]
    vs = [label(v) for v in cfg["variants"]]
    keys = (("step_time_s", "step"), ("peak_rss_mib", "RSS"), ("launch_to_step1_s", "launch->step 1"))
    head = [f"fpo-ds {v} {what} / TRL" for _, what in keys for v in vs]
    r = cfg.get("lora", 0)
    what = f"DPO with LoRA r={r} (all-linear, alpha {2 * r}; TRL + PEFT)" if r else "DPO"
    ref = "reference = adapters off (both)" if r else "live reference"
    lines = [
        f"# fpo-ds vs TRL {cfg['trl']} (DPOTrainer) on CPU: {what}, fp32, beta 0.1, lr 1e-4 constant, "
        f"clipping 1.0, {ref}",
        "",
        f"`{result['command']}`",
        "",
        f"{cfg['steps']} steps of micro-batch {cfg['micro']} per process (no accumulation), toy Llama models, same "
        f"rows in the same order for both; step time = median after the first {cfg['warmup']} steps; "
        f"{cfg['repeats']} repeats, runs interleaved; ratios fpo-ds / TRL, median [min, max] over repeats "
        "(definitions: fpo_ds/tools/benchmarks/bench_trl.py).",
        "",
        "| model | procs | " + " | ".join(head) + " |",
        "|---|---|" + "---|" * len(head),
    ]
    for c in result["cells"]:
        cells = [_spread(ratios(c, v, k)) for k, _ in keys for v in vs]
        lines.append(f"| {c['model']} ({c['params'] / 1e6:.2f}M) | {c['procs']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | procs | runner | step time (s) | peak RSS/rank (MiB) | launch->step 1 (s) | max loss gap to TRL |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        for name, runs in c["runs"].items():
            gap = max(abs(x - y) for a, b in zip(runs, c["runs"]["trl"]) for x, y in zip(a["losses"], b["losses"]))
            vals = " | ".join(_spread([r[k] for r in runs]) for k, _ in keys)
            lines.append(f"| {c['model']} | {c['procs']} | {name} | {vals} | {gap:.1e} |")
    same = all(c.get("same_token_ids") for c in result["cells"])
    lines += [
        "",
        f"Token ids TRL trained on equal fpo-ds's: {'yes' if same else 'NO'} (checked on every model and "
        "process count).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    args.command = "fpo-ds bench " + shlex.join(argv if "--against" in argv else ["--against", "trl", *argv])
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit(f"fpo-ds bench --against trl needs TRL: pip install trl=={trl_run.TRL_VERSION} (or .[dev])")
    print(markdown(run(args)))


if __name__ == "__main__":
    main()
