"""Shared by the subprocess-launching tests."""

import os
import subprocess
from pathlib import Path

import pytest

from fpo_ds.pipeline import child_env

ROOT = Path(__file__).resolve().parent.parent


def subprocess_env(**extra: str) -> dict:
    """The launcher's child environment plus the test settings: CPU accelerator, offline hub, private op cache."""
    env = child_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.update(extra)
    return env


def need_infra(script: str) -> None:
    """Bring up test infrastructure (tests/infra/SCRIPT); skip only outside CI when it cannot exist here."""
    proc = subprocess.run(["bash", str(ROOT / "tests" / "infra" / script)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        msg = f"{script} failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
