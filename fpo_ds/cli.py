"""`fpo-ds` command line: one subcommand per entry point."""

from __future__ import annotations

import argparse
import os
import sys


def _validate(args) -> int:
    from fpo_ds import config as C
    from fpo_ds import local_paths
    from fpo_ds.sae import registry_problems

    try:
        recipe = C.load(args.recipe, args.overrides)
    except C.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    from fpo_ds.data_sources import split_problems

    problems = registry_problems(recipe.sae.release, recipe.sae.sae_id) if recipe.sae.release else []
    problems += split_problems(recipe.data)
    path_problems, notes = local_paths.check(recipe)
    if problems + path_problems:
        print(C.ConfigError(problems + path_problems, args.recipe), file=sys.stderr)
        return 1
    for line in C.recipe_warnings(recipe):
        print(f"{args.recipe}: warning: {line}", file=sys.stderr)
    for line in notes:
        print(f"{args.recipe}: {line}")
    print(f"{args.recipe}: ok ({recipe.loss.method}, {recipe.model.name_or_path}; local paths exist)")
    return 0


def _toy(args) -> int:
    from fpo_ds.tools.demo import toy

    out = toy.write_world(args.out, args.arch, args.n_train, args.n_eval, args.seed)
    print(f"wrote tiny {args.arch} world to {out}")
    return 0


def _export(args) -> int:
    from fpo_ds import checkpoint

    out = checkpoint.export(args.checkpoint, args.out, args.dtype, args.form)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def _eval(args) -> int:
    from fpo_ds.tools.demo import evaluate, toy

    models = dict(m.split("=", 1) for m in args.model)
    judge = toy.judge if args.judge == "toy" else None
    results = evaluate.compare_models(
        models,
        args.reference,
        args.data,
        args.out,
        beta=args.beta,
        sae_path=args.sae,
        judge=judge,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    for name, r in results.items():
        print(name, {k: round(v, 4) for k, v in r.items() if isinstance(v, int | float)})  # not the per-pair lists
    print(f"generations (AlpacaEval's layout; `fpo-ds generate` writes each benchmark's own): {args.out}/generations/")
    return 0


DELEGATED = {
    "train": "fpo_ds.train",
    "build-cache": "fpo_ds.cache_build",
    "demo": "fpo_ds.tools.demo.run",
    "bench": "fpo_ds.tools.benchmarks.bench",
    "plan": "fpo_ds.tools.planner.plan",
    "generate": "fpo_ds.generate",
    "compare-report": "fpo_ds.tools.comparison.report",
    "data": "fpo_ds.data_report",
    "launch": "fpo_ds.launch",
}


DISTRIBUTED = ("train", "build-cache", "generate")  # every rank reports its own failure (fpo_ds.dist)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in DISTRIBUTED:
        return _run(argv)
    from fpo_ds.dist import USER_ERRORS

    try:
        return _run(argv)
    except USER_ERRORS as e:  # bad input: the message names the file/key and the fix
        if os.environ.get("FPO_DS_TRACEBACK") == "1":
            raise
        print(f"fpo-ds {argv[0]}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _run(argv: list[str]) -> int:
    if argv[:1] and argv[0] in DELEGATED:  # entry points with their own argument parsers
        import importlib

        code = importlib.import_module(DELEGATED[argv[0]]).main(argv[1:])
        return code if isinstance(code, int) else 0
    p = argparse.ArgumentParser(prog="fpo-ds", description="FPO and DPO-family preference training on DeepSpeed")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="train a recipe (run under fpo-ds launch / torchrun / deepspeed / srun)")
    sub.add_parser("launch", help="torchrun for train, build-cache, generate: one message per failure, 75 if preempted")
    sub.add_parser("build-cache", help="run the reference once and write the offline cache (same launchers)")
    sub.add_parser("demo", help="the whole pipeline on the embedded tiny world (CPU, minutes)")
    sub.add_parser("bench", help="step time / memory of every method side by side, ratios to SimPO")
    sub.add_parser("plan", help="per-GPU memory estimate for a recipe on N nodes x G GPUs, and what to change")
    sub.add_parser("generate", help="answer AlpacaEval / Arena-Hard / MT-Bench questions into their answer files")
    sub.add_parser("compare-report", help="the table of a slurm/compare.sh run: held-out metrics, answers, judges")
    sub.add_parser("data", help="what the model will see: rows kept per source, lengths, truncation, --show N pairs")
    v = sub.add_parser("validate", help="check a recipe without touching a GPU, a model or the network")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(fn=_validate)
    t = sub.add_parser("toy", help="write the embedded tiny world (tokenizer, tiny model, toy data)")
    t.add_argument("out")
    t.add_argument("--arch", choices=["gemma2", "llama"], default="gemma2")
    t.add_argument("--n-train", type=int, default=512)
    t.add_argument("--n-eval", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_toy)
    e = sub.add_parser("export", help="ZeRO checkpoint directory -> Hugging Face model directory")
    e.add_argument("checkpoint", help="a checkpoint tag directory, e.g. runs/x/checkpoints/step_00000100")
    e.add_argument("out")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument(
        "--form",
        default="auto",
        choices=["auto", "full", "adapter", "merged"],
        help="auto: the full model, or for a LoRA run (model.lora) its PEFT adapter; merged: LoRA merged into the base",
    )
    e.set_defaults(fn=_export)
    ev = sub.add_parser("eval", help="compare models (HF dirs, e.g. exported checkpoints) against their reference")
    ev.add_argument("--reference", required=True, help="the reference (SFT) model directory")
    ev.add_argument("--data", required=True, help="held-out preference pairs (.jsonl/.json/.parquet/.arrow)")
    ev.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help="a model to evaluate (repeat)")
    ev.add_argument("--sae", help="SAE directory (sae-lens save_model) for feature drift")
    ev.add_argument("--out", default="runs/eval")
    ev.add_argument("--beta", type=float, default=0.1)
    ev.add_argument("--judge", choices=["toy", "none"], default="none")
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(fn=_eval)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
