"""The demo's report: tables in the paper's layout (mean +- std over seeds) and training curves.

Every number comes from files the runs wrote (eval/seed*/results.json, runs/*/metrics.jsonl).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from fpo_ds.tools.evaluate import win_rate

COLUMNS = [
    ("judge_accuracy", "judge acc"),
    ("win_vs_sft", "win vs SFT"),
    ("preference_accuracy", "pref. acc"),
    ("reward_margin", "margin"),
    ("feature_mse", "feature MSE"),
    ("seq_kl", "seq KL"),
    ("entropy", "entropy"),
]
# (metrics.jsonl key, panel title, y axis): every panel plots the mean over seeds per optimizer step.
CURVES = [
    ("loss", "loss", "training loss"),
    ("rewards/margins", "reward margin", "reward(chosen) - reward(rejected)"),
    ("rewards/accuracies", "reward accuracy", "share of pairs, chosen reward higher"),
    ("fpo/feature_mse_rejected", "FPO feature MSE (rejected)", "SAE feature MSE to the reference"),
    ("tdpo/seq_kl_rejected", "TDPO sequence KL (rejected)", "KL(reference || policy), nats"),
]


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def tables(results: list[dict], methods: tuple[str, ...]) -> str:
    """results: one eval results dict per seed (keys: reference and each method)."""
    rows = ["| method | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name in ("reference", *methods):
        cells = []
        for key, _ in COLUMNS:
            if key == "win_vs_sft":
                vals = [win_rate(r[name]["scores"], r["reference"]["scores"]) for r in results]
            else:
                vals = [r[name][key] for r in results if key in r[name]]
            cells.append(_fmt(vals))
        rows.append(f"| {'SFT (reference)' if name == 'reference' else name} | " + " | ".join(cells) + " |")
    others = [m for m in methods if m != "fpo"] + ["reference"]
    h2h = [
        "| | " + " | ".join("SFT" if o == "reference" else o for o in others) + " |",
        "|---" * (len(others) + 1) + "|",
    ]
    h2h.append(
        "| FPO win rate vs | "
        + " | ".join(_fmt([win_rate(r["fpo"]["scores"], r[o]["scores"]) for r in results]) for o in others)
        + " |"
    )
    return "\n".join(rows) + "\n\nHead-to-head (judge, ties count half):\n\n" + "\n".join(h2h)


def curves_figure(out: Path, methods: tuple[str, ...], seeds: int):
    """One panel per CURVES entry, one line per method: the per-step mean over the seeds' metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.9))
    for ax, (key, title, ylabel) in zip(axes, CURVES):
        for m in methods:
            per_seed = []
            for s in range(1, seeds + 1):
                path = out / "runs" / f"{m}-s{s}" / "metrics.jsonl"
                recs = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
                if recs and key in recs[0]:
                    per_seed.append([r[key] for r in recs])
            if per_seed:
                n = min(len(c) for c in per_seed)
                ax.plot(range(1, n + 1), [statistics.fmean(c[i] for c in per_seed) for i in range(n)], label=m)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend()
    fig.suptitle(f"Training curves per method: each line is the mean over {seeds} data-order seeds")
    fig.tight_layout()
    return fig


def _curves(out: Path, methods: tuple[str, ...], seeds: int) -> Path:
    import matplotlib.pyplot as plt

    fig = curves_figure(out, methods, seeds)
    path = out / "curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write(out: Path, methods: tuple[str, ...], seeds: int) -> Path:
    results = [json.loads((out / "eval" / f"seed{s}" / "results.json").read_text()) for s in range(1, seeds + 1)]
    plot = _curves(out, methods, seeds)
    recipes = sorted(str(p.relative_to(out)) for p in out.glob("runs/*/recipe.yaml"))
    text = (
        f"# FPO demo: tiny Gemma2-style model, toy digit-repeat preferences, {seeds} seeds (mean ± std)\n\n"
        + tables(results, methods)
        + f"\n\nColumns: judge acc = share of held-out prompts whose sampled answer the judge accepts; win vs SFT ="
        " head-to-head judge win rate against the reference; pref. acc = chosen beats rejected by mean token"
        " log-likelihood on held-out pairs; margin = DPO-style reward margin (beta 0.1, summed log-probs); feature"
        " MSE = pooled SAE feature drift from the reference; seq KL = KL(policy || reference) summed over sampled"
        " tokens; entropy = mean per-token entropy of the policy along its samples.\n\n"
        f"Seeds: data order seeds 1..{seeds}. Curves: `{plot.name}` (each line the mean over the {seeds} seeds)."
        f" Resolved recipes: {', '.join(recipes)}.\n"
    )
    path = out / "report.md"
    path.write_text(text)
    return path
