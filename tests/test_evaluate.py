"""Evaluation pieces: batched generation, win rates, report tables from results files."""

import json

import pytest
import torch

from fpo_ds import model as M
from fpo_ds.tools.demo import evaluate, report, toy


def test_win_rate_counts_ties_half():
    assert evaluate.win_rate([1, 0, 1, 0], [0, 0, 1, 1]) == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)


def test_batched_left_padded_generation_equals_one_by_one(world):
    model, tok = evaluate.load_model(world / "model"), M.load_tokenizer(str(world / "model"))
    prompts = [p["prompt"] for p in toy.toy_pairs(5, 7)] + ["Repeat: 1"]
    batched = evaluate.generate(model, tok, prompts, 8, seed=0, bs=6, temperature=0)
    single = [evaluate.generate(model, tok, [p], 8, seed=0, bs=1, temperature=0)[0] for p in prompts]
    assert batched == single and all(len(g) > 0 for g in batched)


def test_judge_checks_the_copy():
    assert toy.judge("Repeat: 1 2 3 4", "1 2 3 4") and not toy.judge("Repeat: 1 2 3 4", "1 2 4 3")


def test_report_tables_come_from_results(tmp_path):
    methods = ("dpo", "fpo")
    keys = ("judge_accuracy", "preference_accuracy", "reward_margin", "feature_mse", "seq_kl", "entropy")
    results = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        res = {n: {k: torch.rand(1, generator=g).item() for k in keys} for n in ("reference", *methods)}
        for n in res:
            res[n]["scores"] = torch.randint(0, 2, (10,), generator=g).float().tolist()
        results.append(res)
        (tmp_path / "eval" / f"seed{seed}").mkdir(parents=True)
        (tmp_path / "eval" / f"seed{seed}" / "results.json").write_text(json.dumps(res))
    text = report.write(tmp_path, methods, 2).read_text()
    fpo_acc = [r["fpo"]["judge_accuracy"] for r in results]
    mean = sum(fpo_acc) / 2
    sd = (sum((x - mean) ** 2 for x in fpo_acc) / 1) ** 0.5
    assert f"| fpo | {mean:.3f} ± {sd:.3f} |" in text
    h2h = [evaluate.win_rate(r["fpo"]["scores"], r["dpo"]["scores"]) for r in results]
    assert f"| FPO win rate vs | {sum(h2h) / 2:.3f}" in text
    diffs = [[a - b for a, b in zip(r["fpo"]["scores"], r["dpo"]["scores"])] for r in results]
    mean, lo, hi = report.paired_bootstrap(diffs)
    assert f"| FPO − DPO | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" in text  # only judge scores are per item here
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_bootstrap_of_identical_methods_is_centred_on_zero():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2, (3, 200), generator=g).double().numpy()
    mean, lo, hi = report.paired_bootstrap(a - a)
    assert (mean, lo, hi) == (0.0, 0.0, 0.0)
    b = torch.randint(0, 2, (3, 200), generator=g).double().numpy()  # same rate, independent draws
    mean, lo, hi = report.paired_bootstrap(a - b)
    assert lo < 0 < hi


def test_bootstrap_of_a_constant_shift_is_the_shift_and_widens_with_noise():
    g = torch.Generator().manual_seed(1)
    noise = (torch.randn(4, 500, generator=g) * 0.1).double().numpy()
    mean, lo, hi = report.paired_bootstrap(noise - noise + 0.25)
    assert mean == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)
    mean, lo, hi = report.paired_bootstrap(noise + 0.25)
    # Independent of the bootstrap: the mean of 2000 N(0.25, 0.1^2) draws has sd 0.1/sqrt(2000) = 0.0022.
    assert lo < mean < hi and lo > 0.25 - 0.02 and hi < 0.25 + 0.02 and hi - lo > 4 * 0.0022


def test_bootstrap_resamples_seeds_too():
    # Each seed's items agree, but the seeds disagree (+0.2 vs -0.2): the spread between seeds
    # must reach the CI, although every seed alone looks certain.
    diffs = [[0.2] * 100, [-0.2] * 100, [0.2] * 100, [-0.2] * 100]
    mean, lo, hi = report.paired_bootstrap(diffs)
    assert mean == pytest.approx(0.0) and lo < -0.1 and hi > 0.1


def test_bootstrap_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(2)
    d = torch.randn(3, 50, generator=g).double().numpy()
    assert report.paired_bootstrap(d, seed=5) == report.paired_bootstrap(d, seed=5)
    assert report.paired_bootstrap(d, seed=5) != report.paired_bootstrap(d, seed=6)


def test_significance_is_said_in_words():
    n = 300
    results = [
        {
            "reference": {"scores": [0.0] * n, "pref_correct": [0.0] * n},
            "dpo": {"scores": [1.0] * n, "pref_correct": [float(i % 2) for i in range(n)]},
            "fpo": {"scores": [1.0] * n, "pref_correct": [float((i + s) % 2) for i in range(n)]},
        }
        for s in range(3)
    ]
    rows = report.differences(results, ("dpo", "fpo"))
    text = report.significance_sentences(rows)
    assert "- FPO above SFT on judge acc: +1.000 [+1.000, +1.000]" in text
    assert "- DPO above SFT on judge acc" in text
    assert "FPO vs DPO on judge acc" in text.split("Not significant")[1]  # identical scores: no difference
    assert "FPO vs DPO on pref. acc" in text.split("Not significant")[1]
