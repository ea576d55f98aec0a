"""Fault injection with real processes: each fault fails fast with a message, never corrupts.

A fault names what broke, or leaves the last good checkpoint as "latest"; resume=auto then
matches an uninterrupted run.

Faults are injected through fpo_ds.faults's one switch, FPO_DS_FAULT (e.g. "nan_loss@3;nan_grad@4":
rank 1's loss / gradients become NaN at those steps; "die_in_save@4": every rank exits abruptly,
like kill -9, inside the save of step 4).
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env

from fpo_ds import pipeline
from fpo_ds.tools.demo import toy

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parent.parent
ENV = subprocess_env()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.write_world(tmp_path_factory.mktemp("faults") / "world", "gemma2", n_train=64, n_eval=8)


def _args(world, out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "fpo_ds.train",
        "recipes/tiny.yaml",
        f"model.name_or_path={world / 'model'}",
        f"data.path={world / 'data' / 'train.jsonl'}",
        f"output.dir={out}",
        "train.max_steps=6",
        "logging.progress_bar=false",
        "deepspeed.timeout_minutes=2",
        *extra,
    ]


def _train(world, out: Path, *extra: str, port: int, env: dict | None = None, ok: bool = True):
    args = _args(world, out, *extra)
    env = {**ENV, **(env or {})}
    proc = pipeline.torchrun(args, 2, port=port, env=env, cwd=ROOT, capture=True, timeout=300, check=False)
    text = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, text[-4000:]
    return text


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    _train(world, out, "output.save_every=2", "output.keep_last=5", port=29701)
    return out


def test_all_ranks_killed_during_save_keeps_last_good_and_resumes(world, uninterrupted, tmp_path):
    out = tmp_path / "run"
    _train(world, out, "output.save_every=2", port=29702, env={"FPO_DS_FAULT": "die_in_save@4"}, ok=False)
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert (ckpts / "step_00000004").is_dir() and not (ckpts / "step_00000004" / "COMPLETE.json").exists()
    text = _train(world, out, "output.save_every=2", port=29703)
    assert "resumed from" in text and "step_00000002 at step 2" in text
    want, got = _losses(uninterrupted), _losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # steps 3-4 of the crashed run were replaced, not duplicated
    assert [got[s] for s in range(1, 7)] == pytest.approx([want[s] for s in range(1, 7)], abs=1e-5)


def test_a_corrupted_checkpoint_file_is_named_and_the_previous_tag_resumed(world, uninterrupted, tmp_path):
    """Flipped bytes at an unchanged size: the sha256 recorded at save names the file; auto falls back a tag."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shard = sorted((out / "checkpoints" / "step_00000006").glob("*optim_states.pt"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    text = _train(world, out, "output.save_every=2", "output.keep_last=5", port=29721)
    assert f"step_00000006 is damaged: {shard.name}" in text and "passing over step_00000006" in text, text[-3000:]
    assert "step_00000004 at step 4" in text  # the newest intact tag
    got, want = _losses(out), _losses(uninterrupted)
    assert [got[s] for s in (5, 6)] == pytest.approx([want[s] for s in (5, 6)], abs=1e-5)
    marker = json.loads((out / "checkpoints" / "step_00000006" / "COMPLETE.json").read_text())  # saved again
    assert marker["data_fingerprint"] and all(len(e["sha256"]) == 64 for e in marker["files"].values())


def test_a_deleted_checkpoint_shard_is_named_refused_by_path_and_passed_over_by_auto(world, uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    tag = out / "checkpoints" / "step_00000006"
    shard = next(tag.glob("*optim_states.pt"))
    shard.unlink()
    t0 = time.time()
    text = _train(world, out, f"output.resume={tag}", port=29704, ok=False)
    assert f"output.resume: checkpoint {tag} is damaged: {shard.name} is missing" in text, text[-3000:]
    assert time.time() - t0 < 120 and "Traceback" not in text.split("FAILED")[-1][:2000]  # a message, fast
    text = _train(world, out, "output.keep_last=5", port=29732)  # auto: as for a missing `latest`
    assert f"step_00000006 is damaged: {shard.name} is missing; passing over step_00000006" in text, text[-3000:]
    assert "step_00000004 at step 4" in text
    got, want = _losses(out), _losses(uninterrupted)
    assert [got[s] for s in (5, 6)] == pytest.approx([want[s] for s in (5, 6)], abs=1e-5)


def test_nonfinite_loss_or_gradient_skips_the_step_and_halts_after_a_run_of_them(world, uninterrupted, tmp_path):
    from safetensors.torch import load_file

    from fpo_ds import checkpoint

    out = tmp_path / "skip"  # ZeRO-3: step 3 has a NaN loss on rank 1, step 4 NaN gradients with a finite loss
    env = {"FPO_DS_FAULT": "nan_loss@3;nan_grad@4"}
    text = _train(world, out, "train.max_steps=5", "output.save_every=1", "output.keep_last=5", port=29705, env=env)
    recs = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert recs[3]["loss"] is None and recs[3]["lr"] == 0.0 and recs[3]["nonfinite_skipped_steps"] == 1
    assert math.isfinite(recs[4]["loss"]) and recs[4]["grad_norm"] is None and recs[4]["lr"] == 0.0
    assert recs[4]["nonfinite_skipped_steps"] == 2 and math.isfinite(recs[2]["loss"])
    assert recs[5]["lr"] > 0 and recs[5]["nonfinite_skipped_steps"] == 2  # the next step trains again
    assert "step 3: non-finite loss; step skipped" in text and "step 4: non-finite gradient; step skipped" in text
    ids = re.search(r"step 3: non-finite loss; step skipped .*Pair ids: \[([0-9, ]+)\]", text)
    assert ids and len(ids.group(1).split(",")) == 8  # every pair of the step (global batch 8), not one micro-batch's
    # The whole step is skipped with the optimizer untouched: Adam's moments and step count after the two
    # skipped steps are those after step 2, on every rank.
    ckpt = out / "checkpoints"
    for shard in sorted((ckpt / "step_00000002").glob("*optim_states.pt")):
        before = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        after = torch.load(ckpt / "step_00000004" / shard.name, map_location="cpu", weights_only=False)
        after = after["optimizer_state_dict"]
        assert after.pop("overflow") and not before.pop("overflow")  # DeepSpeed's flag of the last (skipped) step
        before.pop("loss_scaler"), after.pop("loss_scaler")  # an object without ==; fp32: scale 1, not dynamic
        assert before["optimizer_state_dict"]["state"] and _same_state(before, after), shard.name
    assert len(list((ckpt / "step_00000002").glob("*optim_states.pt"))) == 2  # both ranks' shards were compared
    skipped = load_file(
        str(checkpoint.export(out / "checkpoints" / "step_00000004", tmp_path / "a") / "model.safetensors")
    )
    before = load_file(
        str(checkpoint.export(uninterrupted / "checkpoints" / "step_00000002", tmp_path / "b") / "model.safetensors")
    )
    assert all(torch.isfinite(t).all() for t in skipped.values())
    assert all(torch.equal(skipped[k], before[k]) for k in before)  # both skipped steps left the weights unchanged
    halted = tmp_path / "halt"  # ZeRO-2 skips a non-finite gradient itself; the run still counts and halts
    text = _train(
        world,
        halted,
        "train.max_nonfinite_steps=2",
        "deepspeed.config=ds_configs/zero2_bf16.json",
        port=29706,
        env={"FPO_DS_FAULT": "nan_grad@2,3,4"},
        ok=False,
    )
    assert "step 2: non-finite gradient; step skipped" in text, text[-3000:]
    assert "2 steps in a row with a non-finite loss or gradient (last: step 3" in text
    assert not (halted / "checkpoints").exists()  # nothing written after the weights became suspect


def _same_state(a, b) -> bool:
    """Equal optimizer states: every tensor and number, recursively (Adam's moments and step counts included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same_state, a, b))
    return a == b


def _long_run(world, out: Path, port: int, logged: int) -> subprocess.Popen:
    """A 2-rank training far longer than any test waits, returned once `logged` steps are in metrics.jsonl."""
    proc = subprocess.Popen(
        pipeline.torchrun_cmd(2, port) + _args(world, out, "train.max_steps=400", "train.epochs=50"),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics, end = out / "metrics.jsonl", time.time() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= logged) and time.time() < end:
        time.sleep(0.2)
    return proc


def test_killed_rank_ends_torchrun_job_fast(world, tmp_path):
    out = tmp_path / "kill"
    proc = _long_run(world, out, 29707, logged=2)
    victim = None
    for p in Path("/proc").iterdir():
        try:
            env = (p / "environ").read_bytes()
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if b"fpo_ds.train" in cmd and b"RANK=1\0" in env and b"LOCAL_RANK=1\0" in env and str(out).encode() in cmd:
            victim = int(p.name)
    assert victim, "rank 1 not found"
    killed = time.time()
    os.kill(victim, signal.SIGKILL)
    text, _ = proc.communicate(timeout=150)
    assert proc.returncode != 0 and time.time() - killed < 120
    assert "Signal 9" in text or "SIGKILL" in text or "exitcode  : -9" in text, text[-3000:]


def test_disk_full_during_save_keeps_last_good(world, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2200k", "tmpfs", str(mnt)]).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("cannot mount a small tmpfs (root needed)")
        pytest.skip("cannot mount a small tmpfs (not root)")
    try:
        out = mnt / "run"
        text = _train(world, out, "output.save_every=2", "output.keep_last=5", port=29708, ok=False)
        assert "saving checkpoint" in text and "MiB free on that disk" in text and "is intact" in text, text[-3000:]
        latest = (out / "checkpoints" / "latest").read_text()
        from fpo_ds import checkpoint

        checkpoint.verify(out / "checkpoints" / latest)  # the last good checkpoint is whole
        assert not any((p / "COMPLETE.json").exists() for p in (out / "checkpoints").glob("step_*") if p.name > latest)
    finally:
        subprocess.run(["umount", str(mnt)])


def _alive(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions `marker`."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and marker.encode() in (p / "cmdline").read_bytes():
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def test_second_job_is_refused_and_ranks_die_with_their_launcher(world, tmp_path):
    out = tmp_path / "busy"
    first = _long_run(world, out, 29711, logged=1)
    t0 = time.time()
    link = tmp_path / "link"
    link.symlink_to(out)  # another name for the busy directory: the lock is keyed by the real path
    text = _train(world, link, "train.lr=0.5", "data.seed=3", port=29712, ok=False)
    assert f"{link} (real path {out}) is in use by another run (host" in text, text[-3000:]
    assert "nothing was changed" in text
    assert re.search(r"pid \d+", text)
    assert time.time() - t0 < 90 and (out / "recipe.yaml").read_text().count("lr: 0.001") == 1
    assert first.poll() is None  # the first job runs on
    os.kill(first.pid, signal.SIGKILL)  # the launcher dies: its ranks must not outlive it
    first.communicate()  # drain its output and reap it
    time.sleep(10)
    assert _alive(str(out)) == [], "ranks outlived their launcher"
    text = _train(world, out, "train.max_steps=2", port=29713)  # the lock of the dead job is taken over
    assert "took over the lock" in text


def test_resume_refuses_a_changed_meaning_and_applies_a_new_lr(world, uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = (out / "metrics.jsonl").read_text()
    text = _train(world, out, "train.max_steps=8", "loss.method=ipo", "data.seed=4", port=29714, ok=False)
    assert "changes what the run means (data.seed: 0 -> 4; loss.method: 'dpo' -> 'ipo')" in text, text[-3000:]
    assert "output.resume_allow_changes=[data.seed,loss.method]" in text
    assert (out / "metrics.jsonl").read_text() == before  # nothing was touched
    assert text.count("] FAILED:") == 1, text[-3000:]  # one rank's paragraph, the other rank exits quietly
    assert "fpo_ds/" not in text.split("] FAILED:")[-1]  # no traceback through our code (torchrun prints its own)
    text = _train(world, out, "train.max_steps=8", "train.lr=0.01", port=29715)
    assert "resume: train.lr changed 0.001 -> 0.01; applied from step 7" in text
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert lrs[6] == pytest.approx(1e-3) and lrs[7] == pytest.approx(1e-2) and lrs[8] == pytest.approx(1e-2)
    info = json.loads((out / "run_info.json").read_text())
    assert info["resume_changes"]["train.lr"] == [0.001, 0.01]


def _traced(trace: Path) -> dict[int, list[int]]:
    """FPO_DS_TRACE_PAIRS's record: optimizer step -> the example ids every rank trained at it."""
    steps: dict[int, list[int]] = {}
    for f in sorted(trace.glob("rank*.jsonl")):
        for r in map(json.loads, f.read_text().splitlines()):
            steps.setdefault(r["step"], []).extend(r["ids"])
    return steps


def test_resume_with_a_new_batch_size_or_data_set_continues_or_restarts_the_data_order(world, tmp_path):
    """A doubled global batch finishes the epoch where the order stood; a changed data set is refused, then allowed."""
    import random

    rows = (world / "data" / "train.jsonl").read_text().splitlines()
    data, trace, out = tmp_path / "train.jsonl", tmp_path / "trace", tmp_path / "run"
    data.write_text("\n".join(rows) + "\n")
    trace.mkdir()
    env = {"FPO_DS_TRACE_PAIRS": str(trace)}
    _train(world, out, f"data.path={data}", "train.max_steps=4", "output.save_every=2", port=29726, env=env)
    more = (f"data.path={data}", "train.max_steps=null", "train.epochs=2", "train.global_batch_size=16")
    allow = "output.resume_allow_changes=[train.global_batch_size]"
    text = _train(world, out, *more, allow, port=29727, env=env)
    assert "resume: train.global_batch_size changed 8 -> 16 (allowed by output.resume_allow_changes)" in text
    assert "the data order continues at pair 32 of 64 in epoch 0 (0.5 epochs done); 2 step(s) of 16 pairs" in text
    steps = _traced(trace)
    assert sorted(steps) == list(range(1, 11)) and [len(steps[s]) for s in (4, 5, 10)] == [8, 16, 16]
    for epoch in ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10]):  # each epoch trains the 64 pairs once each
        ids = [i for s in epoch for i in steps[s]]
        assert sorted(ids) == list(range(64)), epoch
    epochs = {r["step"]: r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert [epochs[s] for s in (4, 5, 6, 7, 10)] == pytest.approx([0.5, 0.75, 1.0, 1.25, 2.0])
    marker = json.loads((out / "checkpoints" / "step_00000010" / "COMPLETE.json").read_text())
    assert marker["data_order"]["samples_before"] == 4 * 8 + 6 * 16
    # the data file shuffled and cut: refused, nothing touched; then allowed, with its own epoch order
    random.Random(0).shuffle(rows)
    data.write_text("\n".join(rows[:48]) + "\n")
    before = (out / "metrics.jsonl").read_text()
    text = _train(world, out, *more, "train.epochs=3", port=29728, env=env, ok=False)
    assert "resuming with another data set" in text and text.count("] FAILED:") == 1, text[-3000:]
    assert (out / "metrics.jsonl").read_text() == before
    allow = "output.resume_allow_changes=[data.content]"
    text = _train(world, out, *more, "train.max_steps=12", allow, port=29729, env=env)
    assert "a new epoch order over its 48 pairs starts at step 11" in text, text[-3000:]
    steps = _traced(trace)
    new = steps[11] + steps[12]
    assert sorted(steps) == list(range(1, 13)) and len(set(new)) == 32 and max(new) < 48
    epochs = {r["step"]: r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert epochs[12] == pytest.approx(2 / 3)


def test_a_new_run_never_destroys_an_old_one(world, uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    text = _train(world, out, "output.resume=never", port=29716, ok=False)
    assert "holds a run" in text and "output.overwrite=true" in text
    text = _train(world, out, "output.resume=never", "output.overwrite=true", "train.max_steps=2", port=29717)
    assert "took over the lock" not in text  # the refused run above released its lock cleanly
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step_00000006" / "COMPLETE.json").is_file()
    assert sorted(_losses(out)) == [1, 2] and (out / "checkpoints" / "latest").read_text() == "step_00000002"
    # `latest` names a deleted checkpoint, and a crash tore the last metrics line: resume falls back, repairs
    again = tmp_path / "again"
    shutil.copytree(uninterrupted, again)
    shutil.rmtree(again / "checkpoints" / "step_00000006")
    with open(again / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    text = _train(world, again, port=29718)
    assert "names step_00000006, which is missing or incomplete; resuming from step_00000004" in text, text[-3000:]
    assert "dropped 1 torn line(s)" in text
    got, want = _losses(again), _losses(uninterrupted)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert [got[s] for s in range(1, 7)] == pytest.approx([want[s] for s in range(1, 7)], abs=1e-5)


def test_resume_on_another_world_size_continues_the_run(world, uninterrupted, tmp_path):
    """2 ranks -> 1 -> 2: the checkpoint is converted (DeepSpeed's universal form) and the losses continue."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    for ckpt in ("step_00000006",):
        shutil.rmtree(out / "checkpoints" / ckpt)  # resume from step 4, saved by 2 ranks
    (out / "checkpoints" / "latest").write_text("step_00000004")
    args = _args(world, out, "train.max_steps=5", "output.save_every=1", "output.keep_last=5")
    proc = pipeline.torchrun(args, 1, port=29719, env=ENV, cwd=ROOT, capture=True, timeout=300, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "step_00000004 was saved by 2 ranks; converting it for 1" in text and "resumed from" in text
    text = _train(world, out, "train.max_steps=6", "output.save_every=1", "output.keep_last=5", port=29720)
    assert "step_00000005 was saved by 1 ranks; converting it for 2" in text, text[-3000:]
    got, want = _losses(out), _losses(uninterrupted)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    # 1 rank with accumulation 2 vs 2 ranks: the invariance tests' tolerance
    assert [got[s] for s in (5, 6)] == pytest.approx([want[s] for s in (5, 6)], abs=1e-4)
    # A 2-rank run from step 2 at another lr rewrites step_4: its conversion above is stale and is made again
    tag2, keep = out / "checkpoints" / "step_00000002", ("output.save_every=2", "output.keep_last=5")
    _train(world, out, f"output.resume={tag2}", "train.max_steps=4", "train.lr=0.01", *keep, port=29733)
    proc = pipeline.torchrun(_args(world, out, "train.max_steps=5", *keep), 1, port=29734, env=ENV, cwd=ROOT,
                             capture=True, timeout=300, check=False)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "universal/step_00000004 converts an earlier save of step_00000004; converting it again" in text
    assert abs(_losses(out)[5] - got[5]) > 1e-3  # trained on from the rewritten weights, not the old conversion


def test_a_zero2_checkpoint_resumes_on_another_world_size(world, uninterrupted, tmp_path):
    """ZeRO-2 saves no universal-checkpoint info of its own: the conversion adds it, and the losses continue."""
    out, z2 = tmp_path / "run", "deepspeed.config=ds_configs/zero2_fp32.json"
    _train(world, out, z2, "train.max_steps=2", "output.save_every=2", port=29730)
    args = _args(world, out, z2, "train.max_steps=4", "output.save_every=2")
    proc = pipeline.torchrun(args, 1, port=29731, env=ENV, cwd=ROOT, capture=True, timeout=300, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "step_00000002 was saved by 2 ranks; converting it for 1" in text
    got, want = _losses(out), _losses(uninterrupted)  # the ZeRO-3 run: the same fp32 arithmetic
    assert [got[s] for s in (1, 2, 3, 4)] == pytest.approx([want[s] for s in (1, 2, 3, 4)], abs=1e-4)


def test_a_recipe_mistake_is_one_paragraph_from_one_rank(world, tmp_path):
    text = _train(world, tmp_path / "r", "loss.betta=1", "train.max_steps=0", port=29721, ok=False)
    assert text.count("] FAILED: ConfigError") == 1, text[-3000:]  # rank 0 only; rank 1 exits quietly
    assert "loss.betta: unknown key (did you mean loss.beta?)" in text and "train.max_steps: must be >= 1" in text
    assert "fpo_ds/" not in text.split("] FAILED:")[-1]  # no traceback through our code


def _launch(world, out: Path, *extra: str, port: int) -> list[str]:
    """`fpo-ds launch` of a 2-rank training (the wrapper around torchrun users are pointed to)."""
    return [str(Path(sys.executable).parent / "fpo-ds"), "launch", "--nproc_per_node", "2", "--master_port", str(port),
            "train", *_args(world, out, *extra)[2:]]  # fmt: skip


def test_one_rank_failing_is_one_paragraph_and_its_peer_exits_quietly(world, tmp_path):
    """After the ranks met, rank 1 fails alone (as a read error would) while rank 0 waits in a collective."""
    env = {**ENV, "FPO_DS_FAULT": "fail@2"}
    proc = subprocess.run(_launch(world, tmp_path / "r", port=29722), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert text.count("FAILED") == 1 and "rank 1] FAILED: OSError: FPO_DS_FAULT: injected failure" in text, text[-3000:]
    for noise in ("Traceback", "ChildFailedError", "Connection closed", "ProcessGroupGloo", "elastic"):
        assert noise not in text, text[-3000:]


def test_max_steps_beyond_the_epochs_is_refused_once_with_the_numbers(world, tmp_path):
    text = _train(world, tmp_path / "r", "train.max_steps=20", port=29723, ok=False)
    assert text.count("] FAILED:") == 1, text[-3000:]  # every rank finds it after the ranks met; one says it
    assert (
        "train.max_steps=20 is more than the data gives: 64 pairs // train.global_batch_size=8 = 8 steps per epoch "
        "x train.epochs=1 = 8 steps. Set train.epochs=3 to train 20 steps" in text
    ), text[-3000:]
    assert "fpo_ds/" not in text.split("] FAILED:")[-1]  # no traceback through our code (plain torchrun adds its own)


def _wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.time() + timeout
    while not (path.is_file() and len(path.read_text().splitlines()) >= n):
        assert proc.poll() is None and time.time() < end, f"{path}: {n} lines not reached"
        time.sleep(0.2)


def test_ctrl_c_saves_and_exits_130_and_sigterm_exits_75_under_fpo_ds_launch(world, tmp_path):
    """Ctrl-C finishes the step, saves and exits 130; the run resumes; SIGTERM then does the same, with 75.

    The SIGINT goes to the whole process group, as a terminal sends it; the SIGTERM to the launcher
    alone, as a scheduler or a user's `kill` sends it.
    """
    out = tmp_path / "r"
    cmd = _launch(world, out, "train.max_steps=400", "train.epochs=50", port=29724)
    runs, stopped = [], []
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 75)):
        metrics = out / "metrics.jsonl"
        before = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        _wait_lines(metrics, before + 2, proc)
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else os.kill(proc.pid, sig)
        text, _ = proc.communicate(timeout=120)
        assert proc.returncode == code, text[-3000:]
        done = len(metrics.read_text().splitlines())
        how = "interrupted (SIGINT)" if sig == signal.SIGINT else "preempted (SIGTERM)"
        assert f"{how} after step {done}: checkpoint saved; exit code {code}" in text, text[-3000:]
        assert (out / "checkpoints" / "latest").read_text() == f"step_{done:08d}"
        for noise in ("Traceback", "KeyboardInterrupt", "ChildFailedError", "SignalException"):
            assert noise not in text, text[-3000:]
        runs.append(text)
        stopped.append(done)
    assert f"step_{stopped[0]:08d} at step {stopped[0]}" in runs[1] and stopped[1] > stopped[0]
    assert "took over the lock" not in runs[1]  # the interrupted run ended cleanly: no note about a dead holder


def test_second_ctrl_c_exits_at_once_and_a_signal_during_set_up_exits_at_once():
    code = (
        "import os, signal, sys, time\n"
        "from fpo_ds import train\n"
        "p = train.Preemption()\n"
        "if sys.argv[1] == 'setup':\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); sys.exit(3)\n"
        "p.training = True\n"
        "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT)  # the terminal's, torchrun's copy\n"
        "time.sleep(1.2); print('still finishing the step', p.signal, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(5); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "train"], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and "still finishing the step SIGINT" in proc.stdout, proc.stderr[-2000:]
    assert "second Ctrl-C: exiting at once, without a checkpoint" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", code, "setup"], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75 and "SIGTERM during set-up: nothing to save yet" in proc.stderr, proc.stderr[-2000:]
    early = "from fpo_ds import dist; dist.report_failures(); raise KeyboardInterrupt"  # Ctrl-C before the handler
    proc = subprocess.run([sys.executable, "-c", early], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and "interrupted (Ctrl-C); exiting (130)" in proc.stderr
    assert "Traceback" not in proc.stderr
    # build-cache and generate after the rendezvous: preemption stops them at once, saying so, with 75
    stopped = (
        "import os, time\nfrom fpo_ds import dist\ndist.stop_on_signals()\nos.kill(os.getpid(), 15)\ntime.sleep(9)"
    )
    proc = subprocess.run([sys.executable, "-c", stopped], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75 and "SIGTERM: stopped before the end; exiting (75)" in proc.stderr, proc.stderr


def test_ranks_exit_at_once_when_their_launcher_is_killed_just_after_starting_them(world, tmp_path):
    out = tmp_path / "orphan"
    launcher = subprocess.Popen(pipeline.torchrun_cmd(2, 29725) + _args(world, out), cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    end = time.time() + 60
    while len([p for p in _alive(str(out)) if p != launcher.pid]) < 2:  # the ranks exist: still importing
        assert time.time() < end, "ranks not started"
        time.sleep(0.02)
    time.sleep(0.3)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    killed = time.time()
    while _alive(str(out)) and time.time() - killed < 10:
        time.sleep(0.1)
    assert _alive(str(out)) == [], "ranks outlived their launcher (they would wait for the rendezvous)"
