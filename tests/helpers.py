"""Shared by the subprocess-launching tests."""

from pathlib import Path

from infra_state import need_infra  # noqa: F401 - the tests import it from here

from fpo_ds.pipeline import child_env

ROOT = Path(__file__).resolve().parent.parent


def subprocess_env(**extra: str) -> dict:
    """The launcher's child environment plus the test settings: CPU accelerator, offline hub, private op cache."""
    env = child_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.update(extra)
    return env
