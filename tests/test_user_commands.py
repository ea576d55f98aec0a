"""A new user's commands, run as the user runs them (the `fpo-ds` entry point in a fresh process).

Thread count of a bare run, offline hub errors that name the recipe key, `fpo-ds validate`'s checks
of local paths, and log lines that stay whole when ranks share a terminal. Single-process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fpo_ds import dist, threads

ROOT = Path(__file__).resolve().parent.parent
FPO_DS = [sys.executable, "-m", "fpo_ds.cli"]


def _user_env(**extra: str | None) -> dict:
    """The environment of a user with the venv active: no OMP_NUM_THREADS, the Hub unreachable."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    for key in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def _fpo_ds(*args: str, env: dict, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*FPO_DS, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- threads


def test_thread_rule():
    assert threads.choose({}, 2, 1, on_cpu=True)[0] == 1  # CPU accelerator: the ranks are the parallelism
    assert threads.choose({}, 64, 8, on_cpu=False)[0] == 8  # GPU node: cores // ranks
    assert threads.choose({}, 4, 8, on_cpu=False)[0] == 1  # never below one
    n, why = threads.choose({"OMP_NUM_THREADS": "3"}, 2, 1, on_cpu=True)
    assert n == 3 and "OMP_NUM_THREADS" in why  # the user's setting wins
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='two': expected a whole number >= 1"):
        threads.choose({"OMP_NUM_THREADS": "two"}, 2, 1, on_cpu=True)


def test_bare_train_sets_its_threads_and_offline_hub_errors_name_the_key(world, tmp_path):
    # A bare single-process run, OMP_NUM_THREADS unset: the trainer picks one thread and says so; the
    # hub dataset then fails (offline) with data.path named and the two fixes.
    hub_data = "HuggingFaceH4/ultrafeedback_binarized"
    args = [f"model.name_or_path={world / 'model'}", f"data.path={hub_data}", f"output.dir={tmp_path / 'a'}"]
    proc = _fpo_ds("train", "recipes/tiny.yaml", *args, env=_user_env())
    assert proc.returncode != 0
    assert "threads: 1 per rank x 1 rank(s) on this node" in proc.stdout and "CPU accelerator" in proc.stdout
    assert f"FAILED: OSError: data.path: '{hub_data}' is not a local path" in proc.stderr, proc.stderr[-3000:]
    assert "Fix: pass a local copy (data.path=<" in proc.stderr and "with HF_HUB_OFFLINE and" in proc.stderr
    assert "Traceback" not in proc.stderr
    # The user's OMP_NUM_THREADS wins; a hub model fails naming model.name_or_path.
    env = _user_env(OMP_NUM_THREADS="3")
    proc = _fpo_ds("train", "recipes/gemma-2-2b.yaml", f"output.dir={tmp_path / 'b'}", env=env)
    assert proc.returncode != 0 and "threads: 3 per rank" in proc.stdout and "(OMP_NUM_THREADS" in proc.stdout
    assert "FAILED: OSError: model.name_or_path: 'google/gemma-2-2b' is not a local path" in proc.stderr
    assert "Fix: pass a local copy (model.name_or_path=<save_pretrained directory>)" in proc.stderr


def test_offline_sae_names_its_keys(tmp_path):
    code = (
        "from fpo_ds import sae\n"
        "sae.load_sae(release='gemma-scope-2b-pt-res-canonical', sae_id='layer_25/width_16k/canonical')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_user_env(), capture_output=True, text=True, timeout=300)
    named = "OSError: sae.release/sae.sae_id: 'gemma-scope-2b-pt-res-canonical layer_25/width_16k/canonical'"
    assert named in proc.stderr, proc.stderr[-3000:]
    assert "Fix: pass a local copy (sae.path=<sae-lens save_model directory>)" in proc.stderr


# ----------------------------------------------------------------------------- log lines


class _Recorder:
    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_each_log_line_is_one_write(monkeypatch):
    # With PYTHONUNBUFFERED (as under Slurm) every write reaches the terminal at once: a line written
    # in pieces lets another rank's line land inside it.
    out, err = _Recorder(), _Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("RANK", "0")
    dist.log("step", 3, "loss", 0.5)
    dist.log_all("FAILED:", "boom")
    assert out.writes == ["step 3 loss 0.5\n"]
    assert len(err.writes) == 1 and err.writes[0].endswith("rank 0] FAILED: boom\n")


# ----------------------------------------------------------------------------- validate


def test_validate_checks_local_paths_and_names_each_key(world, tmp_path):
    env = _user_env()
    proc = _fpo_ds("validate", "recipes/tiny.yaml", "model.name_or_path=/no/such/dir", env=env, timeout=120)
    assert proc.returncode == 1 and "model.name_or_path: /no/such/dir does not exist" in proc.stderr
    assert "fpo-ds toy runs/world" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "stray").write_text("")
    bad = [
        f"model.name_or_path={tmp_path}",  # a directory, but no config.json
        f"data.path={tmp_path / 'missing.jsonl'}",
        "loss.method=fpo",
        f"sae.path={tmp_path / 'no-sae'}",
        f"sae.feature_weights={tmp_path / 'w.pt'}",
        f"cache.dir={tmp_path / 'cache'}",  # holds files but no manifest
        "deepspeed.config=nope.json",
        f"output.resume={tmp_path / 'no-ckpt'}",
    ]
    proc = _fpo_ds("validate", "recipes/tiny.yaml", *bad, env=env, timeout=120)
    assert proc.returncode == 1 and "7 problem(s)" in proc.stderr, proc.stderr
    for key in ("model.name_or_path", "data.path", "sae.path", "sae.feature_weights", "cache.dir", "deepspeed.config"):
        assert f"  - {key}: " in proc.stderr, key
    assert "  - output.resume: " in proc.stderr and "has no config.json" in proc.stderr
    good = [
        f"model.name_or_path={world / 'model'}",
        f"data.path={world / 'data' / 'train.jsonl'}",
        "loss.method=fpo",
        "sae.release=gemma-scope-2b-pt-res-canonical",
        "sae.sae_id=layer_25/width_16k/canonical",
        f"cache.dir={tmp_path / 'new-cache'}",
    ]
    proc = _fpo_ds("validate", "recipes/tiny.yaml", *good, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sae.release/sae.sae_id: not checked: hub id gemma-scope-2b-pt-res-canonical" in proc.stdout
    assert "cache.dir: " in proc.stdout and "not built yet" in proc.stdout
    proc = _fpo_ds("validate", "recipes/gemma-2-2b.yaml", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "model.name_or_path: not checked: hub id google/gemma-2-2b" in proc.stdout
    assert "data.path: not checked: hub id HuggingFaceH4/ultrafeedback_binarized" in proc.stdout


def test_every_yaml_under_recipes_is_a_recipe():
    # The comparison's settings (slurm/compare.yaml) are not a recipe and do not live among them.
    from fpo_ds import config as C

    paths = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert paths and all(C.load(p) for p in paths)


# ----------------------------------------------------------------------------- plan


def test_plan_prints_small_host_sizes_in_kib(capsys):
    from fpo_ds import cli

    assert cli.main(["plan", str(ROOT / "recipes" / "gemma-2-2b.yaml"), "--nodes", "8"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "host_cache_per_1k_pairs" in x)
    assert "KiB" in line and "(host memory, not GPU)" in line and " 0.0" not in line, line


# ----------------------------------------------------------------------------- leftovers


def test_passing_sessions_leave_no_pytest_temp_dirs(pytestconfig):
    # What stays under the system temporary directory is listed in the README; pytest's own directories
    # (hundreds of MB after a full run) are removed when the session passes.
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
    readme = (ROOT / "README.md").read_text()
    assert "What stays in the temporary directory afterwards" in readme
    assert "/tmp/fpo-ds-slurm" in readme and "fpo-ds-test-infra" in readme
