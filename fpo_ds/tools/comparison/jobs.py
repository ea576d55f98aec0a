"""The stages behind slurm/compare.sh, resolved and checked before any job is queued.

    eval "$(python -m fpo_ds.tools.comparison.jobs SIZE [--root DIR] [--sft [--sft-data SRC] | --sft-model DIR]
            [--methods LIST]
            [--alpaca-eval FILE] [--arena-hard FILE] [--mt-bench FILE] [--world DIR] [key=value ...])"

Reads slurm/compare.yaml (per-size and per-method settings), builds each stage's recipe
overrides, loads every resulting recipe (a typo fails here, not in a queued job), reads the question
files, writes ROOT/compare.json (what `fpo-ds compare-report` reads) and prints bash assignments for
slurm/compare.sh, which submits the jobs. The layout under ROOT:

    runs/<stage>/      training (and cache-build) run directories: metrics.jsonl, DONE.json, checkpoints
    cache/             the offline reference cache (FPO)
    models/<row>/      exported Hugging Face models (SFT and each method)
    answers/           benchmark answer files, in each benchmark's own layout (fpo-ds generate)
    judge/             judge results the user drops in (see fpo_ds/tools/comparison/report.py)
    logs/              Slurm logs; report.md, report.json: the table
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TextIO

import yaml

from fpo_ds import answer_formats as F
from fpo_ds import config as C

REPO = Path(__file__).resolve().parents[3]
SETTINGS = REPO / "slurm" / "compare.yaml"  # not a recipe: per-size and per-method settings
METHODS = ("dpo", "tdpo1", "tdpo2", "simpo", "fpo")
QUESTION_FLAGS = {"alpaca_eval": "--alpaca-eval", "arena_hard": "--arena-hard", "mt_bench": "--mt-bench"}


def _pairs(overrides: dict, world: Path | None) -> list[str]:
    """{key: value} -> ["key=value", ...] (YAML scalars); "{world}" in a string becomes the world directory."""
    out = []
    for key, value in overrides.items():
        if isinstance(value, str) and world is not None:
            value = value.replace("{world}", str(world))
        text = json.dumps(value) if value is None or isinstance(value, bool) else str(value)
        out.append(f"{key}={text}")
    return out


def _stage(recipe: Path, overrides: list[str], run_dir: Path) -> dict:
    """One training or cache stage writing to run_dir; its recipe is loaded here to fail early on a mistake."""
    overrides = [*overrides, f"output.dir={run_dir}"]
    loaded = C.load(recipe, overrides)
    return {
        "recipe": str(recipe),
        "overrides": overrides,
        "run_dir": str(run_dir),
        "method": loaded.loss.method,
        "model": loaded.model.name_or_path,
        "needs_cache": loaded.loss.ref_kind == "offline",
    }


def _world(size: dict, root: Path, world: str | None) -> Path | None:
    """The tiny world's directory, written (with a random SAE on its last block) when it is missing."""
    if "{world}" not in json.dumps(size):
        return None
    path = Path(world).resolve() if world else root / "world"
    if not (path / "model" / "config.json").is_file() or not (path / "sae" / "cfg.json").is_file():
        from fpo_ds.tools.demo import toy

        if not (path / "model" / "config.json").is_file():
            toy.write_world(path, "gemma2", n_train=64, n_eval=8)
        cfg = json.loads((path / "model" / "config.json").read_text())
        d_in, last = cfg["hidden_size"], cfg["num_hidden_layers"] - 1
        toy.random_sae("jumprelu", d_in, 4 * d_in, last).save_model(str(path / "sae"))
    return path


def _questions(args: argparse.Namespace) -> dict:
    """{format: {"questions": path, "n": count, "_parsed": questions}} for each question file given."""
    out = {}
    for fmt in F.FORMATS:
        path = getattr(args, fmt)
        if path:
            qs = F.read_questions(fmt, path)  # fails here on a malformed file, before anything is queued
            out[fmt] = {"questions": str(Path(path).resolve()), "n": len(qs), "_parsed": qs}
    return out


def build(args: argparse.Namespace, settings: dict) -> dict:
    """The whole comparison: stages, models, answer files (compare.json without the parsed questions)."""
    if args.size not in settings["sizes"]:
        raise ValueError(f"size {args.size!r}: {SETTINGS.name} has {', '.join(settings['sizes'])}")
    size, root = settings["sizes"][args.size], Path(args.root).resolve()
    world = _world(size, root, args.world)
    recipe = (REPO / size["recipe"]).resolve()
    common, user = size.get("overrides") or {}, list(args.overrides)
    stages: dict[str, dict] = {}
    sft_data = _sft_data(args)
    if args.sft:
        sft = common | settings["sft"].get("all", {}) | (settings["sft"].get(args.size) or {}) | sft_data
        stages["sft"] = _stage(recipe, _pairs(sft, world) + user, root / "runs" / "sft")
    sft_model = _sft_model(args, recipe, _pairs(common, world) + user, root)
    base = [f"model.name_or_path={sft_model}", f"cache.dir={root}/cache"]
    method_over = {m: _pairs(common | settings["methods"][m], world) + user + base for m in args.methods}
    for m in args.methods:
        stages[m] = _stage(recipe, method_over[m], root / "runs" / m)
    readers = [m for m in args.methods if stages[m]["needs_cache"]]
    if readers:  # the cache is built from the recipe of a method that reads it (FPO's: SAE, k, data)
        stages["cache"] = _stage(recipe, method_over[readers[0]], root / "runs" / "cache")
    return {
        "size": args.size,
        "root": str(root),
        "recipe": str(recipe),
        "settings": str(SETTINGS),
        "sft": {"source": "trained" if args.sft else "given" if args.sft_model else "recipe", "model": sft_model},
        "methods": list(args.methods),
        "stages": stages,
        "export_dtype": size.get("export_dtype", "auto"),
        "generate": size.get("generate") or {},
        "model_id_prefix": args.model_id_prefix or f"fpo-ds-{args.size}",
    }


def _sft_data(args: argparse.Namespace) -> dict:
    """--sft-data: the SFT stage's rows (an UltraChat-shaped `messages` set, or any other format)."""
    if not args.sft_data:
        return {}
    if not args.sft:
        raise ValueError("--sft-data: the SFT stage runs only with --sft")
    from fpo_ds.data_sources import LOCAL_SPLIT, kind

    local = kind(args.sft_data) in ("file", "glob")
    path = str(Path(args.sft_data).resolve()) if local and Path(args.sft_data).exists() else args.sft_data
    return {"data.path": path, "data.split": args.sft_split or (LOCAL_SPLIT if local else "train_sft")}


def _sft_model(args: argparse.Namespace, recipe: Path, overrides: list[str], root: Path) -> str:
    """The reference of every method: the exported SFT stage, a given SFT model, or the recipe's model."""
    if args.sft:
        return str(root / "models" / "sft")
    if args.sft_model:
        return str(Path(args.sft_model).resolve()) if Path(args.sft_model).exists() else args.sft_model
    return C.load(recipe, overrides).model.name_or_path


def add_answers(plan: dict, questions: dict) -> dict:
    """Model ids, model directories and the answer file of every row (sft + methods) for each benchmark."""
    root = Path(plan["root"])
    plan["rows"] = {}
    for row in ["sft", *plan["methods"]]:
        model_id = f"{plan['model_id_prefix']}-{row}"
        trained = row in plan["stages"]
        model_dir = str(root / "models" / row) if trained else plan["sft"]["model"]
        answers = {
            fmt: str(F.answer_path(fmt, root / "answers", model_id, q["_parsed"])) for fmt, q in questions.items()
        }
        run_dir = plan["stages"][row]["run_dir"] if trained else None
        plan["rows"][row] = {"model_id": model_id, "model_dir": model_dir, "run_dir": run_dir, "answers": answers}
    plan["questions"] = {fmt: {k: v for k, v in q.items() if k != "_parsed"} for fmt, q in questions.items()}
    return plan


def generate_args(plan: dict, row: str) -> list[str]:
    """slurm/generate.sh arguments for one row: [--from RUN --export-dtype D] MODEL_DIR + fpo-ds generate flags."""
    info, out = plan["rows"][row], []
    if info["run_dir"] and row != "sft":  # the SFT model is exported by its own job, before the methods start
        out += ["--from", info["run_dir"], "--export-dtype", plan["export_dtype"]]
    out += [info["model_dir"], "--model-id", info["model_id"], "--out", f"{plan['root']}/answers"]
    for fmt, q in plan["questions"].items():
        out += ["--format", fmt, "--questions", q["questions"]]
    for key, value in plan["generate"].items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def shell(plan: dict) -> str:
    """Bash assignments for slurm/compare.sh (every value quoted)."""

    def arr(name: str, items: list[str]) -> str:
        return f"{name}=({' '.join(shlex.quote(str(i)) for i in items)})"

    st = plan["stages"]
    lines = [f"ROOT={shlex.quote(plan['root'])}", arr("METHODS", plan["methods"])]
    lines.append(f"SFT_MODEL={shlex.quote(plan['sft']['model'])}")
    lines.append(f"EXPORT_DTYPE={shlex.quote(plan['export_dtype'])}")
    for name, stage in st.items():
        lines.append(arr(f"ARGS_{name}", [stage["recipe"], *stage["overrides"]]))
        lines.append(f"RUN_{name}={shlex.quote(stage['run_dir'])}")
        lines.append(f"CACHE_{name}={int(stage['needs_cache'])}")
    lines.append(f"HAS_SFT={int('sft' in st)}")
    lines.append(f"HAS_CACHE={int('cache' in st)}")
    for row in plan["rows"]:
        lines.append(arr(f"GEN_{row}", generate_args(plan, row) if plan["questions"] else []))
    return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fpo_ds.tools.comparison.jobs", description=__doc__.split("\n\n")[0])
    p.add_argument("size", help="a size of slurm/compare.yaml: 2b, 9b or tiny")
    p.add_argument("--root", help="runs, cache, models, answers, report (default runs/compare-SIZE)")
    sft = p.add_mutually_exclusive_group()
    sft.add_argument("--sft", action="store_true", help="run the SFT stage from the recipe's base model first")
    sft.add_argument("--sft-model", help="an SFT model (directory or hub id): the reference of every method")
    p.add_argument("--sft-data", help="--sft: its rows instead of paper.yaml's (e.g. a local UltraChat copy)")
    p.add_argument("--sft-split", help="--sft-data's split (default: train for a local file, else train_sft)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    for fmt, flag in QUESTION_FLAGS.items():
        p.add_argument(flag, dest=fmt, help=f"{fmt} question file (fpo-ds generate --format {fmt})")
    p.add_argument("--world", help="tiny: the world directory (default ROOT/world, written if missing)")
    p.add_argument("--model-id-prefix", help="answer files name each model PREFIX-<row> (default fpo-ds-SIZE)")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides for every stage")
    args = p.parse_intermixed_args(argv)
    args.root = args.root or f"runs/compare-{args.size}"
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"--methods: {','.join(bad) or 'empty'}: choose from {','.join(METHODS)}")
    return args


def _stdout_for_the_plan() -> TextIO:
    """The real stdout, kept for the plan alone.

    Anything else written to stdout from here on (DeepSpeed's logger, a library's print, even from C)
    goes to stderr, so slurm/compare.sh evaluates nothing but the plan.
    """
    sys.stdout.flush()
    plan_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return plan_out


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    plan_out = _stdout_for_the_plan() if argv is None else sys.stdout
    settings = yaml.safe_load(SETTINGS.read_text())
    try:
        plan = add_answers(build(args, settings), _questions(args))
    except (C.ConfigError, ValueError, FileNotFoundError) as e:  # the message names the file/key and the fix
        sys.exit(f"slurm/compare.sh: {e}")
    root = Path(plan["root"])
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "judge").mkdir(exist_ok=True)
    (root / "compare.json").write_text(json.dumps(plan, indent=1) + "\n")
    plan_out.write(shell(plan))
    plan_out.flush()


if __name__ == "__main__":
    main()
