"""`fpo-ds compare-report ROOT`: the comparison's table, from what was measured and judged.

Reads ROOT/compare.json (written by slurm/compare.sh), then per row (SFT and each method):

- held-out metrics: the last `eval_*` record of the run's metrics.jsonl (after the last step):
  `eval_accuracy/length_normalised` (the paper's preference accuracy), `eval_accuracy/dpo_reward`
  (methods with a reference), FPO's `eval_fpo/feature_mse_chosen|rejected`, `eval_loss`;
- the answer files `fpo-ds generate` wrote (answers, mean length in characters, answers cut at
  --max-new-tokens from the settings.json beside each file);
- judge results the user drops into ROOT/judge/, matched by the model id of the answer files
  (`<prefix>-<row>`, e.g. fpo-ds-2b-fpo):
    alpaca_eval/**/leaderboard.csv  AlpacaEval's own leaderboard (first column the model name,
                                    `length_controlled_winrate`, `win_rate`), e.g. copied from
                                    the directory `alpaca_eval evaluate` writes
    arena_hard*.txt                 Arena-Hard-Auto's `show_result.py` output, saved as printed:
                                    v0.1 lines `MODEL | score: 23.4 | 95% CI: ...` (percent) or the
                                    v2 table `IDX MODEL SCORES CI` (a fraction, reported x100); the
                                    first category block that names the model counts
    mt_bench/*.jsonl                FastChat's single-answer judgments (data/mt_bench/model_judgment/
                                    gpt-4_single.jsonl): the mean `score` over both turns, -1 dropped,
                                    as FastChat's show_result computes it
    scores.json                     anything else, by hand: {"MODEL_ID": {"alpaca_eval_lc": 12.3,
                                    "alpaca_eval_wr": 10.1, "arena_hard": 8.0, "mt_bench": 6.1}};
                                    a value from a tool's file above takes precedence

and writes ROOT/report.md (the table in the paper's layout, then the details) and report.json.
A cell with nothing measured or judged shows "–"; no number is ever filled in otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

from fpo_ds import metrics

LABELS = {"sft": "SFT", "dpo": "DPO", "tdpo1": "TDPO-1", "tdpo2": "TDPO-2", "simpo": "SimPO", "fpo": "FPO"}
JUDGED = ("alpaca_eval_lc", "alpaca_eval_wr", "arena_hard", "mt_bench")
COLUMNS = {  # key -> (header, format)
    "alpaca_eval_lc": ("AlpacaEval 2 LC (%)", "{:.1f}"),
    "alpaca_eval_wr": ("AlpacaEval 2 WR (%)", "{:.1f}"),
    "arena_hard": ("Arena-Hard WR (%)", "{:.1f}"),
    "mt_bench": ("MT-Bench", "{:.2f}"),
    "accuracy": ("Held-out acc. (%)", "{:.1f}"),
    "dpo_reward_accuracy": ("Held-out DPO-reward acc. (%)", "{:.1f}"),
    "feature_mse": ("Feature MSE chosen / rejected", "{:.4g} / {:.4g}"),
}
BENCH_NAMES = {"alpaca_eval": "AlpacaEval 2", "arena_hard": "Arena-Hard", "mt_bench": "MT-Bench"}
DASH = "–"


# ----------------------------------------------------------------------------- what the runs measured


def starting_policy_eval(plan: dict) -> dict:
    """The SFT model's held-out metrics when no SFT run was made here; {} if none.

    Step 0 of a method's run: the starting policy, before any update (logged when train.eval_every > 0).
    """
    for row, info in plan["rows"].items():
        if row != "sft" and info["run_dir"]:
            ev = metrics.last_eval(Path(info["run_dir"]) / "metrics.jsonl", up_to=0)
            if ev:
                return ev
    return {}


def held_out(ev: dict) -> dict:
    """Table cells from a held-out record: accuracies in percent, FPO's feature MSE as (chosen, rejected)."""
    pct = lambda k: 100 * ev[k] if k in ev else None  # noqa: E731
    mse = ("eval_fpo/feature_mse_chosen", "eval_fpo/feature_mse_rejected")
    return {
        "accuracy": pct("eval_accuracy/length_normalised"),
        "dpo_reward_accuracy": pct("eval_accuracy/dpo_reward"),
        "feature_mse": tuple(ev[k] for k in mse) if all(k in ev for k in mse) else None,
    }


def answer_stats(path: Path) -> dict | None:
    """Answers, mean characters per answer turn, and answers cut at --max-new-tokens; None without the file."""
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":  # AlpacaEval: a JSON list of {instruction, output, generator}
        turns = [[r["output"]] for r in json.loads(text)]
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        turns = [_turns(r) for r in rows]
    flat = [t for ts in turns for t in ts]
    settings = Path(f"{path}.settings.json")
    cut = json.loads(settings.read_text()).get("answers_cut_at_max_new_tokens") if settings.is_file() else None
    return {"answers": len(turns), "mean_chars": sum(map(len, flat)) / max(len(flat), 1), "cut": cut}


def _turns(row: dict) -> list[str]:
    """Answer turns of an Arena-Hard (messages) or MT-Bench (choices) answer row."""
    if "choices" in row:
        return list(row["choices"][0]["turns"])
    return [row["messages"][-1]["content"]["answer"]]


# ----------------------------------------------------------------------------- what the judges said


def alpaca_eval_scores(judge: Path) -> dict[str, dict]:
    """{model: {alpaca_eval_lc, alpaca_eval_wr}} from AlpacaEval leaderboard CSVs under judge/alpaca_eval/."""
    out: dict[str, dict] = {}
    for path in sorted(judge.glob("alpaca_eval/**/leaderboard.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                name = row.get("") or row.get("Unnamed: 0") or row.get("name") or row.get("model")
                got = {
                    "alpaca_eval_lc": _number(row.get("length_controlled_winrate")),
                    "alpaca_eval_wr": _number(row.get("win_rate")),
                }
                if name:
                    out.setdefault(name, {}).update({k: v for k, v in got.items() if v is not None})
    return out


ARENA_V01 = re.compile(r"^\s*(\S+)\s*\|\s*score:\s*([-0-9.]+)")  # `model | score: 23.4 | 95% CI: ...`
ARENA_V2 = re.compile(r"^\s*\d+\s+(\S+)\s+([0-9.]+)\s+\(")  # `0  model  0.234  (-1.2 / +1.0)`


def arena_hard_scores(judge: Path) -> dict[str, dict]:
    """{model: {arena_hard}} (percent) from saved `show_result.py` outputs judge/arena_hard*.txt."""
    out: dict[str, dict] = {}
    for path in sorted(judge.glob("arena_hard*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if m := ARENA_V01.match(line):
                name, score = m.group(1), float(m.group(2))
            elif m := ARENA_V2.match(line):
                name, score = m.group(1), 100 * float(m.group(2))
            else:
                continue
            out.setdefault(name, {}).setdefault("arena_hard", score)
    return out


def mt_bench_scores(judge: Path) -> dict[str, dict]:
    """{model: {mt_bench}}: the mean single-answer score (both turns, -1 = failed judgment dropped)."""
    sums: dict[str, list[float]] = {}
    for path in sorted(judge.glob("mt_bench/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if "model" in row and isinstance(row.get("score"), (int, float)) and row["score"] != -1:
                sums.setdefault(row["model"], []).append(float(row["score"]))
    return {m: {"mt_bench": sum(s) / len(s)} for m, s in sums.items()}


def judge_scores(judge: Path) -> dict[str, dict]:
    """{model: {column: value}}: the tools' files first, then judge/scores.json for what they lack."""
    out: dict[str, dict] = {}
    for part in (alpaca_eval_scores(judge), arena_hard_scores(judge), mt_bench_scores(judge)):
        for model, cols in part.items():
            out.setdefault(model, {}).update(cols)
    manual = judge / "scores.json"
    if manual.is_file():
        for model, cols in json.loads(manual.read_text()).items():
            unknown = set(cols) - set(JUDGED)
            if unknown:
                raise ValueError(f"{manual}: {model}: unknown column(s) {sorted(unknown)}; use {', '.join(JUDGED)}")
            for col, value in cols.items():
                out.setdefault(model, {}).setdefault(col, float(value))
    return out


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


# ----------------------------------------------------------------------------- the report


def collect(root: Path) -> dict:
    """Every row's cells, details and what is missing, from ROOT's files."""
    plan = json.loads((root / "compare.json").read_text())
    judged = judge_scores(root / "judge")
    rows, missing = {}, []
    for row, info in plan["rows"].items():
        run = Path(info["run_dir"]) if info["run_dir"] else None
        ev = metrics.last_eval(run / "metrics.jsonl") if run else {}
        if row == "sft" and not run:
            ev = starting_policy_eval(plan)
        done = run is not None and (run / "DONE.json").is_file()
        answers = {fmt: answer_stats(Path(p)) for fmt, p in info["answers"].items()}
        cells = held_out(ev) | {c: judged.get(info["model_id"], {}).get(c) for c in JUDGED}
        rows[row] = {"model_id": info["model_id"], "cells": cells, "eval": ev, "answers": answers, "trained": done}
        if run and not done:
            missing.append(f"{LABELS[row]}: training did not finish ({run}/DONE.json missing)")
        if run and not ev:
            missing.append(f"{LABELS[row]}: no held-out metrics in {run}/metrics.jsonl")
        missing += [
            f"{LABELS[row]}: no {BENCH_NAMES[f]} answers ({p})" for f, p in info["answers"].items() if not answers[f]
        ]
    return {"plan": plan, "rows": rows, "missing": missing}


def cell(key: str, value) -> str:
    if value is None:
        return DASH
    fmt = COLUMNS[key][1]
    return fmt.format(*value) if isinstance(value, tuple) else fmt.format(value)


def main_table(rows: dict) -> list[str]:
    """The paper's layout: one row per method, benchmarks first, then the held-out measurements."""
    head = ["Method", *(h for h, _ in COLUMNS.values())]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, r in rows.items():
        lines.append("| " + " | ".join([LABELS[row], *(cell(k, r["cells"][k]) for k in COLUMNS)]) + " |")
    return lines


def details_table(rows: dict, benchmarks: list[str]) -> list[str]:
    """Per row: model id, steps, held-out step and loss, answers per benchmark (mean characters, cut)."""
    head = ["Method", "model id", "held-out at step", "eval_loss", *(BENCH_NAMES[b] for b in benchmarks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, r in rows.items():
        ev = r["eval"]
        loss = f"{ev['eval_loss']:.4f}" if "eval_loss" in ev else DASH
        bench = []
        for b in benchmarks:
            a = r["answers"].get(b)
            cut = f", {a['cut']} cut" if a and a["cut"] else ""
            bench.append(f"{a['answers']} answers, {a['mean_chars']:.0f} chars{cut}" if a else DASH)
        lines.append("| " + " | ".join([LABELS[row], r["model_id"], str(ev.get("step", DASH)), loss, *bench]) + " |")
    return lines


def render(report: dict) -> str:
    plan, rows = report["plan"], report["rows"]
    benchmarks = list(plan["questions"])
    sft = plan["sft"]
    lines = [
        f"# Comparison: {plan['size']} ({Path(plan['recipe']).name})",
        "",
        f"Reference and starting policy of every method: `{sft['model']}` (SFT {sft['source']}). "
        f"Settings: `{Path(plan['settings']).name}`. {DASH}: not measured or not judged.",
        "",
        *main_table(rows),
        "",
        "Held-out acc.: share of held-out pairs whose chosen response has the higher mean token log-prob "
        "(eval_accuracy/length_normalised); DPO-reward acc.: higher log pi/pi_ref (methods with a reference); "
        "feature MSE: FPO's SAE-feature distance to the reference on the held-out pairs. Judge scores: "
        f"files in `{plan['root']}/judge/` (see `fpo_ds/tools/comparison/report.py`), matched by model id.",
        "",
        "## Details",
        "",
        *details_table(rows, benchmarks),
        "",
    ]
    if report["missing"]:
        lines += ["## Not finished", "", *(f"- {m}" for m in report["missing"]), ""]
    return "\n".join(lines)


def write(root: str | Path) -> Path:
    """Write ROOT/report.md and ROOT/report.json; returns the markdown's path."""
    root = Path(root)
    report = collect(root)
    (root / "report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "plan"}, indent=1) + "\n")
    path = root / "report.md"
    path.write_text(render(report))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fpo-ds compare-report", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="the comparison's directory (slurm/compare.sh --root; holds compare.json)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not (Path(args.root) / "compare.json").is_file():
        sys.exit(f"fpo-ds compare-report: {args.root}/compare.json not found; run slurm/compare.sh first")
    path = write(args.root)
    print(path.read_text())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
