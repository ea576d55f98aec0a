"""SAE loading (sae-lens) and the registry check used by `fpo-ds validate`."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import yaml


@cache
def _registry() -> dict:
    """sae-lens's shipped registry of published SAEs, read without importing sae_lens (slow)."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def registry_problems(release: str, sae_id: str) -> list[str]:
    """Empty if sae-lens knows (release, sae_id); otherwise messages naming the keys."""
    import difflib

    reg = _registry()
    if not reg:
        return []  # sae-lens not installed: nothing to check against
    if release not in reg:
        close = difflib.get_close_matches(release, list(reg), n=1)
        return [f"sae.release: {release!r} is not a sae-lens release" + (f" (did you mean {close[0]}?)" if close else "")]
    ids = [s["id"] for s in reg[release].get("saes", [])]
    if sae_id not in ids:
        close = difflib.get_close_matches(sae_id, ids, n=1)
        return [f"sae.sae_id: {sae_id!r} is not in release {release}" + (f" (did you mean {close[0]}?)" if close else "")]
    return []
