"""`bash bench/gpu_check.sh --dry-run`: every stage of the GPU check at toy size on the CPU, and its results layout.

The script is what a GPU session runs in its few minutes of device time; this proves it runs end
to end (the gpu-marked tests on the CPU, FPO vs SimPO under the profiler, the sweep, the planner
calibration, the summary) and leaves no model or checkpoint behind.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(out: Path, timeout: int) -> subprocess.CompletedProcess:
    from helpers import subprocess_env

    cmd, env = ["bash", "bench/gpu_check.sh", "--dry-run", str(out)], subprocess_env(PYTHON=sys.executable)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.multiproc
def test_dry_run_runs_every_stage_and_writes_the_layout(tmp_path):
    out = tmp_path / "gpu-check"
    proc = _dry_run(out, 600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["env"]["device"] == "CPU"
    assert sorted(res["stages"]) == ["calibrate", "profile", "sweep", "unit", "world"]
    assert all(s["rc"] == 0 and not s["timed_out"] for s in res["stages"].values())
    unit = res["unit"]
    assert not unit["failed"] and not unit["skipped"] and len(unit["passed"]) == 10
    assert any("topk-decnorm" in n for n in unit["passed"]) and any("bf16" in n for n in unit["passed"])
    prof = res["profile"]
    assert [len(prof["top"][m]) for m in ("simpo", "fpo")] == [15, 15] and len(prof["diff"]) == 15
    assert prof["verdict"][0].startswith("Unprofiled: FPO") and any("SAE read" in v for v in prof["verdict"])
    assert prof["parts"]["fpo"]["fpo:sae_read (host)"] > 0 and prof["parts"]["simpo"]["fpo:sae_read (host)"] == 0
    for m in ("simpo", "fpo"):
        assert (out / "profile" / m / "trace.json.gz").stat().st_size > 0
    points = res["sweep"]  # the profile's two points (ZeRO-3), then the sweep's
    assert [p["point"] for p in points[:2]] == ["profile-simpo", "profile-fpo"]
    assert [p["status"] for p in points] == ["ok"] * len(points) and len(points) >= 4
    assert {p["zero_stage"] for p in points} == {0, 3} and {p["checkpointing"] for p in points} == {True, False}
    assert len({p["micro"] for p in points}) >= 2 and all(p["mfu"] > 0 and p["mfu_6n"] > 0 for p in points)
    assert [r["point"] for r in res["calibrate"]] == [p["point"] for p in points]
    fitted = next(r for r in res["calibrate"] if r["point"] == r["fitted_on"])
    assert fitted["point"] == "profile-fpo"
    assert abs(fitted["step_error"]) < 1e-6  # the MFU fitted there reproduces its own step
    plan = (out / "calibrate" / "plan.txt").read_text()  # the planner pinned to the measured FPO MFU
    assert "(exit 0)" in plan and "--calibrate bench.json" in plan and "google/gemma-2-2b" in plan
    summary = (out / "summary.md").read_text()
    assert "## MFU: the profile stage" in summary and "## FPO vs SimPO" in summary
    assert not (out / "world").exists()  # the model is deleted after the check
    leftovers = [p for p in out.rglob("*") if p.suffix in (".pt", ".safetensors") or "global_step" in p.name]
    assert leftovers == []  # no checkpoint, no weights
    # A second run refuses the used directory instead of mixing results.
    again = _dry_run(out, 60)
    assert again.returncode == 2 and "is not empty" in again.stderr
