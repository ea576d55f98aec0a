"""Hugging Face Hub loads that fail say which recipe key named the hub id, and the two ways out.

Without the Hub (no network, or HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 set) transformers raises
"We couldn't connect to 'https://huggingface.co' ...", datasets a ConnectionError
(OfflineModeIsEnabled) and sae-lens its own: none of them says which setting asked for the download.
"""

from __future__ import annotations

import contextlib
import os

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_vars() -> list[str]:
    """The offline switches set in this environment (e.g. ['HF_HUB_OFFLINE=1'])."""
    on = ("1", "true", "yes", "on")
    return [f"{v}={os.environ[v]}" for v in OFFLINE_VARS if os.environ.get(v, "").strip().lower() in on]


def message(key: str, name: str, local: str, cause: BaseException) -> str:
    """The paragraph for hub id `name` (recipe key `key`) that could not be loaded; `local`: the local setting."""
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    switches = offline_vars()
    offline = f" ({', '.join(switches)} set)" if switches else ""
    unset = f" with {' and '.join(s.split('=')[0] for s in switches)} unset" if switches else ""
    return (
        f"{key}: {name!r} is not a local path, and loading it from the Hugging Face Hub failed{offline}: "
        f"{type(cause).__name__}: {first.rstrip('.')}. Fix: pass a local copy ({local}), or run where the Hub is "
        f"reachable{unset} (the download is cached under HF_HOME, ~/.cache/huggingface by default)"
    )


@contextlib.contextmanager
def named(key: str, name: str, local: str):
    """Re-raise a failed hub load of `name` naming `key` and the fixes.

    transformers and sae-lens (huggingface_hub) raise OSError subclasses, datasets a ConnectionError
    (also an OSError); any other exception passes unchanged.
    """
    try:
        yield
    except OSError as e:
        raise OSError(message(key, name, local, e)) from None
