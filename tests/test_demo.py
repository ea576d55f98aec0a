"""The README's main command end to end (one seed): world -> SFT -> SAE -> cache -> 4 methods -> eval -> report."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fpo_ds.tools.demo import report
from fpo_ds.tools.demo import run as D

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parent.parent
METHODS = ("dpo", "simpo", "tdpo2", "fpo")


def _demo(out: Path) -> str:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "fpo_ds.cli", "demo", "--out", str(out), "--seeds", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, _demo(out)


def test_report_is_computed_from_the_runs(demo):
    out, log = demo
    text = (out / "report.md").read_text()
    results = [json.loads((out / "eval" / "seed1" / "results.json").read_text())]
    assert report.tables(results, METHODS) in text and report.tables(results, METHODS) in log
    rows = report.differences(results, METHODS)
    assert report.differences_table(rows) in text and report.significance_sentences(rows) in text
    numerics = "ATEN_CPU_CAPABILITY=avx2, MKL_CBWR=COMPATIBLE, OMP_NUM_THREADS=1, ONEDNN_MAX_CPU_ISA=AVX2"
    assert f"Numerics: {numerics}." in text
    assert f"Results fingerprint: {report.fingerprint(out, 1)}." in text
    assert (out / "curves.png").stat().st_size > 1000
    for m in METHODS:  # every method trained through the distributed trainer and was evaluated
        assert (out / "runs" / f"{m}-s1" / "DONE.json").is_file()
        gens = json.loads((out / "eval" / "seed1" / "generations" / f"{m}.json").read_text())
        assert set(gens[0]) == {"instruction", "output", "generator"} and len(gens) == 256


def test_every_method_learnt_the_preferences_and_the_readme_claims_hold(demo):
    # What one seed must show: training moved each policy towards the chosen answers of held-out pairs
    # (a positive reward margin), and the README's claims that held on every CPU tried: FPO drifts least
    # from the reference in SAE features (of all methods), and its answers pass the judge more often than
    # DPO's and SimPO's. (Seed 1 here, AMD EPYC: judge 0.81 vs 0.51 and 0.26; feature MSE 0.11 vs >= 0.54.)
    # Whether DPO or SimPO beat SFT, or FPO beats TDPO-2, changed with the CPU: not asserted.
    out, _ = demo
    r = json.loads((out / "eval" / "seed1" / "results.json").read_text())
    for m in METHODS:
        assert r[m]["reward_margin"] > 0.1, (m, r[m]["reward_margin"])
    assert r["fpo"]["feature_mse"] < min(r[m]["feature_mse"] for m in METHODS if m != "fpo"), r
    judge = {m: r[m]["judge_accuracy"] for m in METHODS}
    assert judge["fpo"] > max(judge["dpo"], judge["simpo"]), judge


def test_rerun_skips_completed_stages(demo):
    out, _ = demo
    t0 = time.time()
    log = _demo(out)
    assert "sft: complete, skipped" in log and "methods: complete, skipped" in log
    assert "torch.distributed.run" not in log and time.time() - t0 < 120


def test_resuming_refuses_a_directory_made_with_other_settings(tmp_path):
    settings = {"layout": 2, "steps": 60, "sft_steps": 400, "n_eval": 256}
    D._check_layout(tmp_path, settings)
    D._check_layout(tmp_path, settings)  # same settings: resumes
    with pytest.raises(SystemExit, match="made with"):
        D._check_layout(tmp_path, {**settings, "steps": 30})
    old = tmp_path / "old"
    (old / "world").mkdir(parents=True)
    with pytest.raises(SystemExit, match="older version"):
        D._check_layout(old, settings)
