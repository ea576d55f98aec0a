"""Run-directory integrity in one process: the lock, resume's recipe diff, never destroying a run."""

import dataclasses
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fpo_ds import config as C
from fpo_ds import data as D
from fpo_ds import resume, rundir

BASE = {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}, "loss": {"method": "dpo"}}


def test_recipe_changes_split_into_refused_and_applied():
    old = C.to_dict(C.from_dict(BASE))
    new = C.to_dict(C.from_dict({**BASE, "loss": {"method": "ipo"}, "train": {"lr": 1e-3, "global_batch_size": 64}}))
    refused, applied = resume.recipe_changes(old, new)
    assert set(refused) == {"loss.method", "train.global_batch_size"} and set(applied) == {"train.lr"}
    assert refused["loss.method"] == ("dpo", "ipo")
    logging_only = C.to_dict(C.from_dict({**BASE, "logging": {"every": 5}, "sae": {"shard_group": "world"}}))
    assert resume.recipe_changes(old, logging_only)[0] == {}


def test_second_holder_is_refused_naming_the_first(tmp_path, capsys):
    run = tmp_path / "run"
    rundir.claim(run, "output.dir").release()  # a holder that ended normally leaves no note for the next
    rundir.claim(run, "output.dir").release()
    assert "took over" not in capsys.readouterr().out
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from fpo_ds import rundir; rundir.claim({str(run)!r}, 'output.dir'); "
         "import time; print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    try:
        with pytest.raises(OSError, match=rf"output.dir: {run} is in use by another run \(host .*pid {holder.pid}"):
            rundir.claim(run, "output.dir")
        run.mkdir(exist_ok=True)
        (tmp_path / "link").symlink_to(run)  # another name for the same directory meets the same lock
        with pytest.raises(OSError, match=rf"output.dir: {tmp_path / 'link'} \(real path {run}\) is in use"):
            rundir.claim(tmp_path / "link", "output.dir")
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    rundir.claim(run, "output.dir").release()  # the dead holder's lock is taken over, with a note
    assert f"took over the lock of {run} from a process that is gone" in capsys.readouterr().out


def test_prepare_refuses_to_start_over_a_run_and_moves_it_aside_when_asked(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    cfg = C.from_dict({**BASE, "output": {"dir": str(out), "resume": "never"}}).output
    with pytest.raises(ValueError, match="holds a run .* output.overwrite=true"):
        rundir.prepare(cfg)
    rundir.prepare(dataclasses.replace(cfg, overwrite=True))
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and (moved[0] / "checkpoints").is_dir() and out.is_dir() and not rundir.holds_run(out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="output.dir: .*file is a file"):
        rundir.prepare(dataclasses.replace(cfg, dir=str(tmp_path / "file")))


def test_torn_metrics_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    rundir.repair_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'


def test_launcherless_run_picks_a_free_port():
    import socket

    from fpo_ds import dist

    with socket.socket() as busy:
        try:
            busy.bind(("127.0.0.1", 29500))  # the port a launcher-less run used to hard-code
            busy.listen()
        except OSError:
            pass  # already taken by something else: just as good
        topo = dist.discover({})
        assert topo.source == "single process" and topo.master_port != 29500
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", topo.master_port))  # free
    assert dist.discover({"MASTER_PORT": "29613"}).master_port == 29613  # a port the user set wins


def test_launch_exit_code_tells_preemption_from_failure():
    from fpo_ds import launch

    assert launch.exit_code([0, 0]) == 0 and launch.exit_code([75, 75]) == 75 and launch.exit_code([0, 75]) == 75
    assert launch.exit_code([130, 75]) == 130  # Ctrl-C reached one rank first; the run still saved
    assert launch.exit_code([75, 1]) == 1 and launch.exit_code([-9, 75]) == 137  # a failure outranks a stop
    args = launch.parse(["--nproc_per_node", "2", "train", "recipes/tiny.yaml", "train.lr=1"])
    assert (args.training_script, args.module, args.training_script_args) == ("fpo_ds.train", True, [
        "recipes/tiny.yaml", "train.lr=1"])  # fmt: skip
    assert "SIGUSR1" in args.signals_to_handle and args.shutdown_timeout == launch.SHUTDOWN_TIMEOUT_S


def test_the_old_cache_entry_point_refuses_with_a_pointer():
    """`python -m fpo_ds.cache` once built the cache; it now says where the build went instead of exiting 0."""
    proc = subprocess.run([sys.executable, "-m", "fpo_ds.cache"], capture_output=True, text=True)
    assert proc.returncode == 1 and "fpo-ds build-cache RECIPE" in proc.stderr


def test_keep_last_prunes_universal_conversions_with_their_tags(tmp_path):
    from fpo_ds import checkpoint

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step_0000000{step}").mkdir(parents=True)
        (root / f"step_0000000{step}" / checkpoint.MARKER).write_text("{}")
        (root / "universal" / f"step_0000000{step}").mkdir(parents=True)
    (root / "universal" / "step_00000002.partial").mkdir()  # a conversion killed half-way
    checkpoint._prune(root, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert sorted(p.name for p in (root / "universal").iterdir()) == ["step_00000004", "step_00000006"]


def test_a_changed_data_set_is_refused_unless_allowed(tmp_path):
    """The checkpoint's data fingerprint against this run's: same -> the old order; other -> refused or a new order."""
    saved = D.Order(200, 0, 32).state(4)
    plan = resume.ResumePlan(tag=tmp_path / "step_00000004", step=4, data_fingerprint="aaa", data_order=saved)
    recipe = C.from_dict(BASE)
    assert resume.data_order(plan, "aaa", 200, recipe) == D.Order(**saved)  # unchanged: the order continues
    assert resume.data_order(resume.ResumePlan(), "bbb", 200, recipe) == D.Order(200, 0, 32)  # a fresh run
    with pytest.raises(ValueError, match=r"another data set.*aaa -> bbb.*resume_allow_changes=\[data.content\]"):
        resume.data_order(plan, "bbb", 200, recipe)
    allowed = C.from_dict({**BASE, "output": {"resume_allow_changes": ["data.content"]}})
    fresh = resume.data_order(plan, "bbb", 150, allowed)  # its own epoch order starts after step 4
    assert (fresh.n, fresh.start_step, fresh.epoch, fresh.offset, fresh.samples_before) == (150, 4, 0, 0, 128)
    assert fresh.positions(4) == D.Order(150, 0, 32).positions(0)
    # a checkpoint saved before the order's state was kept: derived from its step and data_start
    legacy = dataclasses.replace(plan, data_fingerprint=None, data_order=None, step=9, data_start=0)
    assert resume.data_order(legacy, "bbb", 200, recipe) == D.Order(**D.Order(200, 0, 32).state(9))


def test_a_damaged_tag_is_passed_over_by_auto_refused_by_path_and_all_damaged_is_refused(tmp_path):
    """Missing file, wrong size, other bytes, unreadable marker: each names the tag and the file."""
    import hashlib
    import json

    from fpo_ds import checkpoint

    root = tmp_path / "run" / "checkpoints"

    def tag(step: int, payload: bytes = b"weights") -> Path:
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(payload)
        entry = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        (d / checkpoint.MARKER).write_text(json.dumps({"step": step, "world_size": 1, "files": {"model.pt": entry}}))
        return d

    good, bad = tag(2), tag(4)
    (root / "latest").write_text(bad.name)
    recipe = C.from_dict({**BASE, "output": {"dir": str(tmp_path / "run")}})
    for damage, said in (
        (lambda d: (d / "model.pt").unlink(), "model.pt is missing"),
        (lambda d: (d / "model.pt").write_bytes(b"weight"), "model.pt is 6 bytes (expected 7)"),
        (lambda d: (d / "model.pt").write_bytes(b"WEIGHTS"), "model.pt no longer match(es) the sha256"),
        (lambda d: (d / checkpoint.MARKER).write_text("{"), "its COMPLETE.json is unreadable"),
    ):
        damage(bad)
        plan = resume.plan(recipe)
        assert plan.tag == good and plan.step == 2
        assert any(f"{bad} is damaged: {said}" in n and "passing over step_00000004" in n for n in plan.notes), said
        by_path = C.from_dict({**BASE, "output": {"dir": str(tmp_path / "run"), "resume": str(bad)}})
        with pytest.raises(ValueError, match=f"output.resume: checkpoint {bad} is damaged: {re.escape(said)}"):
            resume.plan(by_path)
        shutil.rmtree(bad)
        bad = tag(4)
    (good / "model.pt").write_bytes(b"WEIGHTS")
    (bad / "model.pt").unlink()
    with pytest.raises(ValueError, match=r"every checkpoint of .* is damaged \(checkpoint .*step_00000004 is damaged"):
        resume.plan(recipe)


def test_a_universal_conversion_is_reused_only_for_the_same_save_with_its_files_whole(tmp_path):
    import json

    from fpo_ds import checkpoint

    out = tmp_path / "universal" / "step_00000004"
    (out / "zero" / "w").mkdir(parents=True)
    (out / "zero" / "w" / "fp32.pt").write_bytes(b"12345678")
    marker = {"source": "abc", "files": {"zero/w/fp32.pt": 8}}
    (out / checkpoint.MARKER).write_text(json.dumps(marker))
    assert resume._stale_conversion(out, "abc") is None
    assert resume._stale_conversion(out, "xyz") == "converts an earlier save of step_00000004"
    (out / "zero" / "w" / "fp32.pt").write_bytes(b"1234")
    assert resume._stale_conversion(out, "abc") == "is damaged: zero/w/fp32.pt is 4 (expected 8 bytes)"
    (out / "zero" / "w" / "fp32.pt").unlink()
    assert "zero/w/fp32.pt is missing" in resume._stale_conversion(out, "abc")
    (out / checkpoint.MARKER).write_text(json.dumps({"source": "abc"}))  # made before sizes were recorded
    assert "before conversions recorded their file sizes" in resume._stale_conversion(out, "abc")
