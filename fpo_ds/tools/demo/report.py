"""The demo's report: tables (mean +- std over seeds), paired bootstrap CIs, training curves.

Tables in the paper's layout, then the differences between methods with bootstrap confidence
intervals and, in words, which of them are significant. Every number comes from files the runs
wrote (eval/seed*/results.json, runs/*/metrics.jsonl).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import numpy as np

from fpo_ds.tools.demo.evaluate import win_rate

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


# (per-item key in results.json, name in the text): the metrics whose differences are bootstrapped.
PAIRED = [("scores", "judge acc"), ("pref_correct", "pref. acc"), ("feature_mse_pairs", "feature MSE")]


def paired_bootstrap(
    diffs: np.ndarray, n_boot: int = 4000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of paired differences and its percentile CI, resampling seeds, then items within each seed.

    diffs: (seeds, items), a - b for two methods on the same items of each seed's eval set. The
    two-level resampling carries both sources of spread: which runs the seeds produced (SFT init,
    SAE, data order) and which prompts the eval set happened to hold. Returns (mean, lo, hi).
    """
    d = np.asarray(diffs, dtype=np.float64)
    n_seeds, n_items = d.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, (n_boot, n_seeds))
    items = rng.integers(0, n_items, (n_boot, n_seeds, n_items))
    stats = d[seeds[:, :, None], items].mean((1, 2))  # (n_boot,)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


def comparisons(methods: tuple[str, ...]) -> list[tuple[str, str]]:
    """FPO against each baseline, then every method against the SFT reference."""
    return [("fpo", m) for m in methods if m != "fpo"] + [(m, "reference") for m in methods]


def _label(name: str) -> str:
    return {"reference": "SFT", "fpo": "FPO", "dpo": "DPO", "simpo": "SimPO", "tdpo2": "TDPO-2"}.get(name, name)


def differences(results: list[dict], methods: tuple[str, ...]) -> list[dict]:
    """One row per (comparison, metric): mean difference a - b and its 95% CI; significant if the CI excludes 0."""
    rows = []
    for a, b in comparisons(methods):
        for key, name in PAIRED:
            if any(key not in r[a] or key not in r[b] for r in results):
                continue  # e.g. results written before per-item values were kept, or no SAE
            if key == "feature_mse_pairs" and b == "reference":
                continue  # drift from the reference is > 0 by construction: only FPO vs the baselines says something
            diffs = np.array([np.subtract(r[a][key], r[b][key]) for r in results])
            mean, lo, hi = paired_bootstrap(diffs)
            rows.append({"a": a, "b": b, "metric": name, "mean": mean, "lo": lo, "hi": hi, "sig": lo > 0 or hi < 0})
    return rows


def differences_table(rows: list[dict]) -> str:
    """Markdown: one line per comparison, one column per metric, `*` marks a CI that excludes 0."""
    metrics = [name for _, name in PAIRED if any(r["metric"] == name for r in rows)]
    out = ["| difference | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for pair in dict.fromkeys((r["a"], r["b"]) for r in rows):
        cells = {r["metric"]: _ci(r) + (" *" if r["sig"] else "") for r in rows if (r["a"], r["b"]) == pair}
        out.append(f"| {_label(pair[0])} − {_label(pair[1])} | " + " | ".join(cells.get(m, "") for m in metrics) + " |")
    return "\n".join(out)


def _ci(row: dict) -> str:
    return f"{row['mean']:+.3f} [{row['lo']:+.3f}, {row['hi']:+.3f}]"


def significance_sentences(rows: list[dict]) -> str:
    """The differences in words: which CIs exclude 0 (and in which direction), which do not."""
    sig = [r for r in rows if r["sig"]]
    lines = [
        f"- {_label(r['a'])} {'above' if r['mean'] > 0 else 'below'} {_label(r['b'])} on {r['metric']}: {_ci(r)}"
        for r in sig
    ]
    unclear = [f"{_label(r['a'])} vs {_label(r['b'])} on {r['metric']}" for r in rows if not r["sig"]]
    text = "Significant differences (95% CI excludes 0):\n\n" + ("\n".join(lines) if lines else "- none")
    return text + "\n\nNot significant (CI contains 0): " + ("; ".join(unclear) if unclear else "none") + "."


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
    fig.suptitle(
        f"Training curves per method: each line is the mean over {seeds} data-order seeds"
        " (each seed also its own world, SFT reference and SAE)"
    )
    fig.tight_layout()
    return fig


def _curves(out: Path, methods: tuple[str, ...], seeds: int) -> Path:
    import matplotlib.pyplot as plt

    fig = curves_figure(out, methods, seeds)
    path = out / "curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def fingerprint(out: Path, seeds: int) -> str:
    """sha256 (first 16 hex digits) of the seeds' results.json: equal on two machines iff the evals agree bitwise."""
    h = hashlib.sha256()
    for s in range(1, seeds + 1):
        h.update((out / "eval" / f"seed{s}" / "results.json").read_bytes())
    return h.hexdigest()[:16]


def write(out: Path, methods: tuple[str, ...], seeds: int, numerics: str = "") -> Path:
    results = [json.loads((out / "eval" / f"seed{s}" / "results.json").read_text()) for s in range(1, seeds + 1)]
    plot = _curves(out, methods, seeds)
    recipes = sorted(str(p.relative_to(out)) for p in out.glob("runs/*/recipe.yaml"))
    rows = differences(results, methods)
    text = (
        f"# FPO demo: tiny Gemma2-style model, toy digit-repeat preferences, {seeds} seeds (mean ± std)\n\n"
        + tables(results, methods)
        + f"\n\nColumns: judge acc = share of held-out prompts whose sampled answer the judge accepts; win vs SFT ="
        " head-to-head judge win rate against the reference; pref. acc = chosen beats rejected by mean token"
        " log-likelihood on held-out pairs; margin = DPO-style reward margin (beta 0.1, summed log-probs); feature"
        " MSE = pooled SAE feature drift from the reference; seq KL = KL(policy || reference) summed over sampled"
        " tokens; entropy = mean per-token entropy of the policy along its samples.\n\n"
        f"Paired differences a − b, mean over {seeds} seeds x {len(results[0]['reference']['scores'])} held-out"
        " prompts [95% CI: hierarchical bootstrap, seeds resampled, then prompts within each seed; * = CI excludes"
        " 0]. With judge scores of 0 or 1, the head-to-head win rate is 0.5 + (judge acc difference) / 2, so it is"
        " above 0.5 exactly when the judge acc difference is above 0.\n\n"
        + differences_table(rows)
        + "\n\n"
        + significance_sentences(rows)
        + f"\n\nSeeds 1..{seeds}: each builds its own world (data, tokenizer, random init), SFT run, SAE and data"
        f" order. Curves: `{plot.name}` (each line the mean over the {seeds} seeds)."
        f" Resolved recipes: {', '.join(recipes)}.\n\n"
        f"Numerics: {numerics or 'as the environment left them'}. Results fingerprint: {fingerprint(out, seeds)}.\n"
    )
    path = out / "report.md"
    path.write_text(text)
    return path
