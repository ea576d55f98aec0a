"""Evaluation pieces: batched generation, win rates, report tables from results files."""

import json

import pytest
import torch

from fpo_ds import model as M
from fpo_ds.tools import evaluate, report, toy


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
    assert (tmp_path / "curves.png").stat().st_size > 0
