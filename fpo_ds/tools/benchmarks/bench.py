"""`fpo-ds bench`: FPO's cost claim, measured side by side in one run.

Same model, data, batch and sequence lengths for SFT (the floor), SimPO, DPO with a live
reference, DPO with the offline cache, TDPO-2 and FPO; one process launch per method per
repeat, methods interleaved within each repeat (so machine noise hits all of them alike).
Per method: median step time, tokens/s, peak memory per rank (RSS on CPU, CUDA max-allocated
on GPU), and ratios to SimPO with their spread over repeats. Also: cache build time with SAE
features vs the logps-only reference pass, cache read and SAE encode shares of FPO's step
time, and the sharded encoder's communication bytes per step. Writes bench.json and bench.md.

Real shapes on CPU: `--vocab 256000 --seq 512` gives the narrow model Gemma-2's vocabulary and
sequences of 512 tokens (prompt 256, responses 256), where the LM head and its logits dominate.
`--compare-src DIR` runs every method also under another checkout of this package (e.g.
`git worktree add /tmp/old <commit>`), interleaved with this one, and reports this / that per
method: step time, peak memory, the memory above the same run at the toy vocabulary (the
vocabulary-dependent part: logits, LM head and its optimizer state), and the loss difference.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
from pathlib import Path

from fpo_ds import pipeline, zero_auto
from fpo_ds.tools.demo import toy

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "tiny.yaml"
METHODS = {  # name -> overrides
    "sft": {"loss.method": "sft"},
    "simpo": {"loss.method": "simpo"},
    "dpo_live": {"loss.method": "dpo", "loss.reference": "live"},
    "dpo_cache": {"loss.method": "dpo", "loss.reference": "offline"},
    "tdpo2": {"loss.method": "tdpo2"},
    "fpo": {"loss.method": "fpo"},
}
TARGETS = [  # (label, metric, method, vs, limit)
    ("FPO step time <= 1.05 x SimPO", "step_time_s", "fpo", "simpo", 1.05),
    ("FPO peak memory <= 1.05 x SimPO", "peak_mem_mib", "fpo", "simpo", 1.05),
    ("FPO step time <= 0.80 x DPO (live reference)", "step_time_s", "fpo", "dpo_live", 0.80),
    ("FPO peak memory < DPO (live reference)", "peak_mem_mib", "fpo", "dpo_live", 1.0),
]


def _launch(stages: list[dict], out: Path, nproc: int, name: str, src: Path | None = None) -> None:
    """One torchrun launch of the stages, running this package or, with `src`, the checkout at src."""
    if src is None:
        pipeline.launch(stages, out / f"plan-{name}.json", nproc, quiet=name != "cache")
        return
    plan = out / f"plan-{name}.json"
    plan.write_text(json.dumps(stages, indent=1))
    # -m resolves the package from the working directory first: the ranks import src's fpo_ds.
    env = pipeline.child_env(PYTHONPATH=str(src))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(out / ".torch_extensions"))
    pipeline.torchrun(["-m", "fpo_ds.pipeline", str(plan)], nproc, env=env, cwd=src, quiet=True)


def long_rows(n: int, seq: int, seed: int) -> list[dict]:
    """Digit-repeat pairs of about `seq` tokens per prompt and per response (truncated to seq/2 each)."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        digits = [str(rng.randint(0, 9)) for _ in range(seq)]
        wrong = list(digits)
        wrong[3] = str((int(wrong[3]) + 1) % 10)  # an early change: it survives truncation
        rows.append({"prompt": "Repeat: " + " ".join(digits), "chosen": " ".join(digits), "rejected": " ".join(wrong)})
    return rows


def _world(out: Path, args) -> Path:
    """The toy world; with --seq, long pairs; with --vocab, the model at that vocabulary (token ids stay small).

    With --vocab the toy-vocabulary model stays beside it, at model-toyvocab/ (the memory baseline).
    """
    world = out / "world"
    if (world / "model" / "config.json").is_file():
        return world
    toy.write_world(world, args.arch, n_train=args.pairs, n_eval=8, hidden=args.hidden, layers=args.layers)
    if args.seq > 64:
        rows = long_rows(args.pairs, args.seq, seed=0)
        (world / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.vocab or args.seq > 256 or args.shape:  # toy.tiny_config's models hold 256 positions
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(world / "model")
        _write_model(world / "model", args, args.vocab or len(tok), tok)
        if args.vocab:
            _write_model(world / "model-toyvocab", args, len(tok), tok)
    return world


def shape_config(hub_id: str, tok, hidden: int | None = None, layers: int | None = None):
    """A shipped model's architecture (tools/shapes.py: no download), optionally shrunk for a CPU dry run.

    `hidden` narrows the model keeping its head count (head_dim = hidden / heads, MLP 4x); `layers`
    cuts its depth. The vocabulary stays the model's own; the toy tokenizer's ids are a subset.
    """
    from fpo_ds.tools.planner import shapes

    cfg = shapes.model_config(hub_id)
    if hidden:
        cfg.hidden_size, cfg.intermediate_size = hidden, 4 * hidden
        cfg.head_dim = hidden // cfg.num_attention_heads
        if hasattr(cfg, "query_pre_attn_scalar"):
            cfg.query_pre_attn_scalar = cfg.head_dim
    if layers:
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:layers]
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    return cfg


def _write_model(path: Path, args, vocab: int, tok) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if args.shape:
        cfg = shape_config(args.shape, tok, args.shrink_hidden, args.shrink_layers)
    else:
        cfg = toy.tiny_config(args.arch, vocab, tok, args.hidden, args.layers)
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.seq)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def _overrides(world: Path, out: Path, extra: dict, args) -> list[str]:
    base = {
        "model.name_or_path": world / "model",
        "data.path": world / "data/train.jsonl",
        "data.max_length": args.seq,
        "data.max_prompt_length": args.seq // 2,
        "train.micro_batch_size": args.micro,
        "train.global_batch_size": args.micro * args.nproc,
        "train.max_steps": args.steps,
        "train.warmup_steps": 1,
        "train.lr": 1e-4,
        "output.save_every": 0,
        "output.save_final": False,  # a final ZeRO-3 checkpoint of a 2.6B model is ~25 GB: benches keep none
        "logging.progress_bar": False,
        "logging.every": 10**6,
        "deepspeed.config": args.ds_config,
        "sae.path": out / "sae",
        "model.gradient_checkpointing": args.checkpointing,
        "sae.k": 50,
        "cache.dir": out / "cache",
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


def _summary(path: Path, warmup: int) -> dict:
    recs = [json.loads(x) for x in path.read_text().splitlines()][warmup:]
    med = lambda k: statistics.median(r[k] for r in recs)  # noqa: E731
    out = {
        "step_time_s": med("step_time_s"),
        "tokens_per_s": med("tokens_per_s"),
        "peak_mem_mib": max(r["peak_mem_mib"] for r in recs),
    }
    if "time/cache_read_s" in recs[0]:
        out["cache_read_share"] = med("time/cache_read_s") / out["step_time_s"]
    if "time/sae_encode_s" in recs[0]:
        out["sae_encode_share"] = med("time/sae_encode_s") / out["step_time_s"]
    if "fpo/sae_comm_bytes_per_step" in recs[0]:
        out["sae_comm_bytes_per_step"] = med("fpo/sae_comm_bytes_per_step")
    return out


LIVE_REFERENCE = ("dpo_live", "tdpo2")  # methods whose step runs a frozen reference's forward too


def flops_per_token(shape, method: str, seq: int, checkpointing: bool) -> float:
    """Model FLOPs per token in the planner's one convention (fpo_ds/tools/planner/compute.py).

    6N + attention + the recompute under checkpointing, plus a live reference's forward; attention is
    counted at the run's max_length (--seq), an upper bound for shorter pairs.
    """
    from fpo_ds.tools.planner import compute

    flops = compute.train_flops_per_token(shape, seq, checkpointing)
    live = compute.train_flops_per_token(shape, seq, False, forward_only=True) if method in LIVE_REFERENCE else 0
    return flops + live


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def _caches(world: Path, out: Path, args) -> dict:
    """Build the offline caches (FPO's, and log-probs only) in one launch; their manifests.

    With --vocab, also those of the toy-vocabulary model (the memory baseline).
    """

    def stages(model: str, suffix: str, warm: bool) -> list[dict]:
        common = {"model.name_or_path": world / model, "output.dir": out / "runs/cache"}
        fpo = _overrides(world, out, {**common, "loss.method": "fpo", "cache.dir": out / f"cache{suffix}"}, args)
        logps = {**common, "loss.method": "dpo", "loss.reference": "offline", "sae.path": "null"}
        logps = _overrides(world, out, {**logps, "cache.dir": out / f"cache-logps{suffix}"}, args)
        warmup = [o.replace(str(out / "cache-logps"), str(out / "cache-warmup")) for o in logps]
        # A first pass warms the process (kernels, allocator, page cache) so neither timed pass pays for it.
        first = [{"stage": "build-cache", "recipe": str(RECIPE), "overrides": warmup}] if warm else []
        return first + [{"stage": "build-cache", "recipe": str(RECIPE), "overrides": o} for o in (logps, fpo)]

    plan = stages("model", "", warm=True) + (stages("model-toyvocab", "-toyvocab", warm=False) if args.vocab else [])
    for d in ("cache", "cache-logps", "cache-warmup", "cache-toyvocab", "cache-logps-toyvocab"):
        shutil.rmtree(out / d, ignore_errors=True)
    _launch(plan, out, args.nproc, "cache")
    names = (("logps", "cache-logps"), ("fpo", "cache"))
    return {n: json.loads((out / d / "manifest.json").read_text()) for n, d in names}


def _train(world: Path, out: Path, args, method: str, tag: str, src: Path | None, toyvocab: bool = False) -> dict:
    """One training launch of `method`; its summary (and its losses, for the comparison of sources)."""
    run_dir = out / "runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    extra = {**METHODS[method], "output.dir": run_dir}
    if toyvocab:
        extra.update({"model.name_or_path": world / "model-toyvocab", "cache.dir": out / "cache-toyvocab"})
    stage = {"stage": "train", "recipe": str(RECIPE), "overrides": _overrides(world, out, extra, args)}
    _launch([stage], out, args.nproc, tag, src)
    summary = _summary(run_dir / "metrics.jsonl", args.warmup)
    summary["losses"] = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = _world(out, args)
    if not (out / "sae" / "cfg.json").is_file():
        toy.random_sae("jumprelu", args.hidden, args.d_sae, args.layers - 1, seed=0).save_model(str(out / "sae"))
    manifests = _caches(world, out, args)
    chosen = {m: METHODS[m] for m in METHODS if m in args.methods}
    sources = {"this": None, **({"other": Path(args.compare_src).resolve()} if args.compare_src else {})}
    runs: dict[str, dict[str, list[dict]]] = {src: {m: [] for m in chosen} for src in sources}
    for r in range(args.repeats):
        for m in chosen:
            for src, path in sources.items():  # interleaved: machine noise hits both sources alike
                runs[src][m].append(_train(world, out, args, m, f"{m}-{src}-r{r}", path))
                print(f"[bench] repeat {r + 1}/{args.repeats} {m} ({src}): {runs[src][m][-1]}", flush=True)
    per_repeat = runs["this"]
    baseline = {}
    if args.vocab:  # each method once more at the toy vocabulary: what the vocabulary costs is the difference
        for m in chosen:
            for src, path in sources.items():
                baseline[(src, m)] = _train(world, out, args, m, f"{m}-{src}-toyvocab", path, toyvocab=True)
    result = {
        "config": {**vars(args), "out": Path(args.out).name, "ds_config": Path(args.ds_config).name},
        "methods": {},
        "ratios_to_simpo": {},
        "targets": [],
        "cache": {
            "build_seconds_fpo": manifests["fpo"]["build_seconds"],
            "build_seconds_logps_only": manifests["logps"]["build_seconds"],
            "build_ratio": manifests["fpo"]["build_seconds"] / manifests["logps"]["build_seconds"],
            "pairs": manifests["fpo"]["n_pairs"],
            "bytes_per_pair": sum(p["bytes"] for p in manifests["fpo"]["parts"]) / manifests["fpo"]["n_pairs"],
        },
    }
    result["params"] = zero_auto.saved_params(world / "model")
    if args.compare_src:
        result["compare"] = _compare(runs, baseline)
    if baseline:
        result["vocab_mem_mib"] = {
            m: [rep["peak_mem_mib"] - baseline[("this", m)]["peak_mem_mib"] for rep in reps]
            for m, reps in per_repeat.items()
        }
    if args.peak_tflops:
        from fpo_ds.tools.planner import compute, shapes

        result["flops_convention"] = compute.CONVENTION
        shape = shapes.model_shape(str(world / "model"))
    for m, reps in per_repeat.items():
        for rep in reps if args.peak_tflops else []:  # model FLOPs utilisation over all GPUs of the run
            flops = rep["tokens_per_s"] * flops_per_token(shape, m, args.seq, args.checkpointing)
            rep["mfu"] = flops / (args.peak_tflops * 1e12 * args.nproc)
        result["methods"][m] = {k: [rep[k] for rep in reps] for k in reps[0]}
        result["ratios_to_simpo"][m] = {
            k: [rep[k] / base[k] for rep, base in zip(reps, per_repeat["simpo"])]
            for k in ("step_time_s", "peak_mem_mib", "tokens_per_s")
        }
    for label, key, m, vs, limit in TARGETS:
        if m not in chosen or vs not in chosen:
            continue
        ratios = [a[key] / b[key] for a, b in zip(per_repeat[m], per_repeat[vs])]
        ok = statistics.median(ratios) < limit if limit == 1.0 else statistics.median(ratios) <= limit
        result["targets"].append({"target": label, "ratios": ratios, "met": ok})
    share = result["methods"]["fpo"].get("cache_read_share", [0.0])
    result["targets"].append(
        {"target": "cache reads <= 2% of FPO step time", "ratios": share, "met": statistics.median(share) <= 0.02}
    )
    result["targets"].append(
        {
            "target": "cache build <= 1.15 x plain reference pass",
            "ratios": [result["cache"]["build_ratio"]],
            "met": result["cache"]["build_ratio"] <= 1.15,
        }
    )
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(markdown(result))
    return result


def _compare(runs: dict, baseline: dict) -> dict:
    """Per method: this source / the other (step time, peak memory, vocabulary-dependent memory) and loss gaps."""
    out = {}
    for m, these in runs["this"].items():
        others = runs["other"][m]
        row = {
            "step_time_s": ([a["step_time_s"] for a in these], [b["step_time_s"] for b in others]),
            "peak_mem_mib": ([a["peak_mem_mib"] for a in these], [b["peak_mem_mib"] for b in others]),
            "max_loss_diff": max(abs(x - y) for a, b in zip(these, others) for x, y in zip(a["losses"], b["losses"])),
        }
        if baseline:
            base = {src: baseline[(src, m)]["peak_mem_mib"] for src in ("this", "other")}
            row["vocab_mem_mib"] = (
                [a["peak_mem_mib"] - base["this"] for a in these],
                [b["peak_mem_mib"] - base["other"] for b in others],
            )
        out[m] = row
    return out


def markdown(result: dict) -> str:
    """The tables, recomputed from bench.json's raw per-repeat numbers."""
    cfg = result["config"]
    mfu = "mfu" in next(iter(result["methods"].values()))
    lines = [
        f"# fpo-ds bench: {cfg.get('shape') or cfg.get('arch', 'llama') + '-style'} h{cfg['hidden']} x "
        f"{cfg['layers']} layers, vocabulary {cfg.get('vocab') or ('its own' if cfg.get('shape') else 'toy')} "
        f"({result['params'] / 1e6:.1f}M params), {cfg.get('seq', 64)} tokens, "
        f"SAE {cfg['d_sae']} features, {cfg['nproc']} ranks, "
        f"micro {cfg['micro']}, {cfg['repeats']} repeats (median [min, max]), {cfg.get('device', '?')}",
        "",
        "| method | step time (s) | tokens/s | peak mem/rank (MiB) | step vs SimPO | mem vs SimPO |" + (" MFU |" * mfu),
        "|---|---|---|---|---|---|" + ("---|" * mfu),
    ]
    for m, v in result["methods"].items():
        r = result["ratios_to_simpo"][m]
        lines.append(
            f"| {m} | {_spread(v['step_time_s'])} | {_spread(v['tokens_per_s'])} | {_spread(v['peak_mem_mib'])} "
            f"| {_spread(r['step_time_s'])} | {_spread(r['peak_mem_mib'])} |"
            + (f" {_spread(v['mfu'])} |" if mfu else "")
        )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {_spread(t['ratios'])} | {'yes' if t['met'] else 'NO'} |")
    c = result["cache"]
    comm = result["methods"]["fpo"].get("sae_comm_bytes_per_step", [0])
    encode = result["methods"]["fpo"].get("sae_encode_share", [0.0])
    lines += [
        "",
        f"Cache: {c['pairs']} pairs, {c['bytes_per_pair']:.0f} bytes/pair; reference pass with SAE features "
        f"{c['build_seconds_fpo']:.2f} s vs log-probs only {c['build_seconds_logps_only']:.2f} s "
        f"({c['pairs'] / c['build_seconds_fpo']:.0f} vs {c['pairs'] / c['build_seconds_logps_only']:.0f} pairs/s). "
        f"Sharded-encoder traffic: {statistics.median(comm):.0f} bytes/step/rank. SAE encode (forward + backward, "
        f"this rank's slice) share of FPO's step time: {_spread(encode)}.",
    ]
    if "vocab_mem_mib" in result:
        per = ", ".join(f"{m} {_spread(v)}" for m, v in result["vocab_mem_mib"].items())
        lines += ["", f"Peak memory per rank above the same run at the toy vocabulary (MiB): {per}."]
    if "compare" in result:
        lines += _compare_table(result["compare"], cfg.get("compare_src"))
    return "\n".join(lines) + "\n"


def _compare_table(compare: dict, other: str | None) -> list[str]:
    """This checkout vs --compare-src; 'vocab mem' is peak memory above the same run at the toy vocabulary."""
    vocab = "vocab_mem_mib" in next(iter(compare.values()))
    ratio = lambda a, b: [x / y for x, y in zip(a, b)]  # noqa: E731
    lines = [
        "",
        f"This checkout vs {Path(other).name if other else 'the other'} (--compare-src), interleaved; "
        "vocab mem = peak memory per rank above the same run at the toy vocabulary.",
        "",
        "| method | step time (s) this / other | ratio | peak mem/rank (MiB) this / other | ratio |"
        + (" vocab mem (MiB) this / other | other / this |" if vocab else "")
        + " max loss diff |",
        "|---|---|---|---|---|" + ("---|---|" if vocab else "") + "---|",
    ]
    for m, row in compare.items():
        (ta, tb), (ma, mb) = row["step_time_s"], row["peak_mem_mib"]
        cells = [
            f"{_spread(ta)} / {_spread(tb)}",
            _spread(ratio(ta, tb)),
            f"{_spread(ma)} / {_spread(mb)}",
            _spread(ratio(ma, mb)),
        ]
        if vocab:
            va, vb = row["vocab_mem_mib"]
            cells += [f"{_spread(va)} / {_spread(vb)}", _spread(ratio(vb, va))]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {row['max_loss_diff']:.2e} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--against" or a.startswith("--against=") for a in argv):  # its own options: see bench_trl
        from fpo_ds.tools.benchmarks import bench_trl

        bench_trl.main(argv)
        return
    p = argparse.ArgumentParser(prog="fpo-ds bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--against", choices=["trl"], help="DPO against TRL instead (options: fpo-ds bench --against trl -h)"
    )
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the medians")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--arch", default="llama", choices=["llama", "gemma2"])
    p.add_argument("--vocab", type=int, help="model vocabulary, e.g. 256000 (Gemma-2); default: the toy tokenizer's")
    p.add_argument("--seq", type=int, default=64, help="data.max_length; prompts keep at most half")
    p.add_argument("--pairs", type=int, default=2048, help="training pairs in the toy world")
    p.add_argument("--compare-src", help="another checkout of fpo-ds: every method runs under both, interleaved")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (simpo and fpo always run)")
    p.add_argument("--ds-config", help="default: zero3_bf16 on GPU, zero3_fp32 on CPU")
    p.add_argument("--peak-tflops", type=float, help="the accelerator's dense peak, for MFU (989 for H100/H200 bf16)")
    p.add_argument("--shape", help="a shipped model's architecture with random weights, e.g. google/gemma-2-2b")
    p.add_argument("--shrink-hidden", type=int, help="with --shape: narrow it to this width (CPU dry run)")
    p.add_argument("--shrink-layers", type=int, help="with --shape: keep this many blocks (CPU dry run)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (gradient_checkpointing)")
    args = p.parse_args(argv)
    if args.shape:  # the SAE reads the last block of the model actually built
        from fpo_ds.tools.planner import shapes

        cfg = shapes.model_config(args.shape)
        args.arch = cfg.model_type if cfg.model_type in ("llama", "gemma2") else args.arch
        args.hidden = args.shrink_hidden or cfg.hidden_size
        args.layers = args.shrink_layers or cfg.num_hidden_layers
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {list(METHODS)}")
    args.methods = sorted(set(args.methods.split(",")) | {"simpo", "fpo"}, key=list(METHODS).index)
    import torch

    args.device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    if args.ds_config is None:
        name = "zero3_bf16.json" if torch.cuda.is_available() else "zero3_fp32.json"
        args.ds_config = str(RECIPE.parent.parent / "ds_configs" / name)
    print(markdown(run(args)))


if __name__ == "__main__":
    main()
