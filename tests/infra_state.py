"""Test infrastructure (tests/infra): bring it up for a test, tear down what the test sessions started.

Kept free of fpo_ds imports: conftest calls `release_infra` at the end of every session.
"""

import contextlib
import fcntl
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What test sessions brought up (Slurm daemons, network namespaces, files under /etc) is listed in
# INFRA/started by the up scripts; each live session holds a file INFRA/sessions/<pid>. The last
# session to finish tears down the list (tests/infra/down.sh); what was there before stays.
INFRA = Path(tempfile.gettempdir()) / "fpo-ds-test-infra"


@contextlib.contextmanager
def _infra_lock():
    INFRA.mkdir(parents=True, exist_ok=True)
    with open(INFRA / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one session at a time brings infrastructure up or down
        yield


def need_infra(script: str) -> None:
    """Bring up test infrastructure (tests/infra/SCRIPT); skip only outside CI when it cannot exist here."""
    with _infra_lock():
        (INFRA / "sessions").mkdir(exist_ok=True)
        (INFRA / "sessions" / str(os.getpid())).touch()
        env = dict(os.environ, FPO_DS_INFRA_STATE=str(INFRA / "started"))
        cmd = ["bash", str(ROOT / "tests" / "infra" / script)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        msg = f"{script} failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_infra() -> str:
    """At the end of a test session: tear down what test sessions brought up, once no other one is running.

    Returns what happened, for the session's summary ("" when this session used no infrastructure).
    """
    mine = INFRA / "sessions" / str(os.getpid())
    if not mine.exists():
        return ""
    with _infra_lock():
        mine.unlink()
        others = []
        for f in (INFRA / "sessions").iterdir():
            if f.name.isdigit() and _alive(int(f.name)):
                others.append(f.name)
            else:
                f.unlink()  # a session that died without tearing down: its share passes to the rest
        if others:
            return f"test infrastructure left up for the other running test session(s) {', '.join(others)}"
        cmd = ["bash", str(ROOT / "tests" / "infra" / "down.sh"), str(INFRA / "started")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        return (proc.stdout + proc.stderr).strip()
