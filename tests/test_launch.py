"""Launchers on real infrastructure, each checked against a torchrun run of the same recipe.

Covered: mpirun, the deepspeed launcher, a real Slurm (sbatch, preemption + requeue + resume,
a killed rank) and two hosts in network namespaces.

Slurm and the namespaces are brought up by tests/infra/*.sh (root). Under CI=true missing
infrastructure fails the run instead of skipping.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import need_infra, subprocess_env

from fpo_ds import pipeline
from fpo_ds.tools.demo import toy

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = subprocess_env()
STEPS = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # One filesystem: the namespace "hosts" and the Slurm jobs all see this directory.
    base = Path(tmp_path_factory.mktemp("launch"))
    return {"world": toy.write_world(base / "world", "gemma2", n_train=64, n_eval=8), "base": base}


def _args(world, name: str, steps: int = STEPS, epochs: int = 1) -> list[str]:
    w = world["world"]
    return [
        "recipes/tiny.yaml",
        f"model.name_or_path={w / 'model'}",
        f"data.path={w / 'data' / 'train.jsonl'}",
        f"output.dir={world['base'] / name}",
        f"train.max_steps={steps}",
        f"train.epochs={epochs}",
        "logging.progress_bar=false",
        "deepspeed.timeout_minutes=2",
    ]


def _losses(world, name: str) -> list[float]:
    lines = (world["base"] / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines]


def _run(cmd: list[str], timeout: int = 300, **kw) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.fixture(scope="module")
def reference(world):
    out = _run(pipeline.torchrun_cmd(2, 29621) + ["-m", "fpo_ds.train", *_args(world, "ref")])
    assert "world 2" in out
    return _losses(world, "ref")


def test_mpirun_matches_torchrun(world, reference):
    if not shutil.which("mpirun"):
        pytest.fail("mpirun missing: the install step must provide Open MPI")
    env_flags = sum(
        (["-x", k] for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR")), []
    )
    out = _run(
        [
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "2",
            *env_flags,
            "-x",
            "MASTER_PORT=29622",
            PY,
            "-m",
            "fpo_ds.train",
            *_args(world, "mpi"),
        ]
    )
    assert "topology (mpi): world 2" in out
    assert _losses(world, "mpi") == pytest.approx(reference, abs=1e-6)


def test_deepspeed_launcher_matches_torchrun(world, reference):
    out = _run(
        [
            str(Path(PY).parent / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            "29623",
            "--module",
            "fpo_ds.train",
            *_args(world, "dslauncher"),
        ]
    )
    assert "world 2" in out
    assert _losses(world, "dslauncher") == pytest.approx(reference, abs=1e-6)


def test_two_hosts_in_network_namespaces(world, reference):
    need_infra("netns_up.sh")
    procs = []
    for i in (1, 2):
        cmd = [
            str(ROOT / "tests" / "infra" / "on_host.sh"),
            str(i),
            *pipeline.torchrun_cmd(1, 29624, nodes=2, node_rank=i - 1, master="10.77.0.1"),
            "-m",
            "fpo_ds.train",
            *_args(world, "twohost"),
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    assert "2 node(s) x 1 rank(s), master 10.77.0.1" in outs[0]
    assert "[node1 rank 0]" in outs[0] and "[node2 rank 1]" in outs[1]
    assert _losses(world, "twohost") == pytest.approx(reference, abs=1e-6)


def test_deepspeed_hostfile_across_two_hosts(world, reference, tmp_path):
    """The multi-node path: `deepspeed --hostfile` (pdsh over ssh) to the two namespace hosts.

    The ssh stand-in gives each host a fresh environment, so the ranks get only what the launcher
    forwards: the variables in `.deepspeed_env` in the launch directory.
    """
    need_infra("netns_up.sh")
    (tmp_path / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
    keep = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TORCH_EXTENSIONS_DIR")
    (tmp_path / ".deepspeed_env").write_text("".join(f"{k}={ENV[k]}\n" for k in keep))
    env = dict(ENV, PATH=f"{ROOT / 'tests' / 'infra' / 'fake_ssh'}:{ENV['PATH']}")
    args = _args(world, "dshostfile")
    args[0] = str(ROOT / args[0])  # the ranks start in the launch directory
    cmd = [str(Path(PY).parent / "deepspeed"), "--hostfile", "hostfile", "--master_port", "29627"]
    proc = subprocess.run(
        [*cmd, "--module", "fpo_ds.train", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "2 node(s) x 1 rank(s), master 10.77.0.1" in out, out[-3000:]
    assert "[node1 rank 0]" in out and "[node2 rank 1]" in out
    assert _losses(world, "dshostfile") == pytest.approx(reference, abs=1e-6)


# ----------------------------------------------------------------------------- Slurm


def _job(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


# Pending reasons that clear by themselves; any other one (PartitionConfig, ...) is a broken cluster.
TRANSIENT = {"None", "Priority", "Resources", "BeginTime", "Dependency"}


def _wait_state(job: str, states: set, timeout: float, release: bool = False) -> str:
    end = time.time() + timeout
    while time.time() < end:
        info = _job(job)
        state = info.get("JobState", "")
        if state in states:
            return state
        reason = info.get("Reason", "None")
        if release and state == "PENDING" and reason == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
        if state == "PENDING" and reason not in TRANSIENT:
            node = subprocess.run(["scontrol", "show", "node"], capture_output=True, text=True).stdout
            raise AssertionError(f"job {job} can never start here (Reason={reason}):\n{node}")
        time.sleep(0.5)
    raise AssertionError(f"job {job} not in {states} after {timeout}s: {_job(job)}")


def _sbatch(
    world, name: str, *extra: str, steps: int = STEPS, epochs: int = 1, script: str = "slurm/train.sh", over=()
) -> tuple[str, Path]:
    log = world["base"] / f"{name}.slurm.out"
    cmd = [
        "sbatch",
        "--parsable",
        "--ntasks-per-node=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={log}",
        *extra,
        script,
        *_args(world, name, steps, epochs),
        *over,
    ]
    env = dict(ENV, PYTHON=PY)
    job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    return job, log


def _wait_step(world, name: str, step: int, timeout: float) -> None:
    path, end = world["base"] / name / "metrics.jsonl", time.time() + timeout
    while time.time() < end:
        if path.is_file() and len(path.read_text().splitlines()) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name}: step {step} not reached in {timeout}s")


@pytest.fixture(scope="module")
def slurm():
    need_infra("slurm_up.sh")


def test_sbatch_trains_with_distinct_ranks(slurm, world, reference):
    job, log = _sbatch(world, "sbatch")
    assert _wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300) == "COMPLETED", log.read_text()
    text = log.read_text()
    assert "topology (slurm): world 2" in text and "rank 0/2" in text and "rank 1/2" in text
    assert (world["base"] / "sbatch" / "checkpoints" / "step_00000003" / "COMPLETE.json").is_file()
    assert _losses(world, "sbatch") == pytest.approx(reference, abs=1e-6)


def test_sbatch_cache_job_then_dependent_offline_training(slurm, world, reference):
    """The documented cluster workflow: slurm/build_cache.sh, then training that waits for it (afterok)."""
    offline = ["loss.reference=offline", f"cache.dir={world['base'] / 'slurm-cache'}"]
    cache_job, cache_log = _sbatch(world, "cachejob", script="slurm/build_cache.sh", over=offline)
    job, log = _sbatch(world, "offline", f"--dependency=afterok:{cache_job}", over=offline)
    assert _wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300) == "COMPLETED", (
        cache_log.read_text()[-3000:] + log.read_text()[-3000:]
    )
    assert _job(cache_job)["JobState"] == "COMPLETED" and (world["base"] / "slurm-cache" / "manifest.json").is_file()
    assert _losses(world, "offline") == pytest.approx(reference, abs=1e-5)  # offline == live reference


def test_preemption_checkpoints_requeues_and_resumes(slurm, world):
    steps = 120  # 64 pairs / global batch 8 = 8 steps per epoch, 15 epochs
    job, log = _sbatch(world, "preempt", steps=steps, epochs=15)
    _wait_step(world, "preempt", 3, 240)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    _wait_state(job, {"PENDING", "REQUEUED", "REQUEUE_HOLD"}, 120)
    # Slurm would hold the requeued job ~2 min (BeginTime); the test releases it early, but only after
    # the old batch script has surely finished: releasing at once let its exit status land on the
    # new allocation and mark the job FAILED (a test-only race, seen once under load).
    time.sleep(8)
    assert _wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 300, release=True) == "COMPLETED", log.read_text()
    text = log.read_text()
    assert "preempted (SIGUSR1" in text and "requeueing job" in text, text[-3000:]
    stopped = int(text.split("preempted (SIGUSR1")[1].split("after step ")[1].split(":")[0])
    assert 3 <= stopped < steps
    assert f"at step {stopped}" in text.split("requeueing job")[1]  # resumed from the preemption checkpoint
    records = [json.loads(x) for x in (world["base"] / "preempt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # nothing repeated, nothing lost
    assert (world["base"] / "preempt" / "checkpoints" / "latest").read_text() == f"step_{steps:08d}"


def test_killed_rank_fails_the_job_fast(slurm, world):
    job, log = _sbatch(world, "killed", steps=400, epochs=50)
    _wait_step(world, "killed", 2, 240)
    pid = None
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job}".encode() in env and b"SLURM_PROCID=1" in env and b"fpo_ds.train" in cmd:
            pid = int(proc.name)
    assert pid, "rank 1 process not found"
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    state = _wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 120)
    assert state == "FAILED" and time.time() - killed_at < 120
    text = log.read_text()
    assert "task 1" in text and ("Killed" in text or "signal 9" in text or "exited" in text), text[-3000:]
