"""SAE loading (sae-lens) and sae-lens's registry: `fpo-ds validate`'s check and the planner's SAE widths.

`sharded_encoder` loads the recipe's SAE, checks it fits the model, and keeps only this rank's
slice (encoder.ShardedEncoder); nothing else of the SAE stays resident.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import yaml

from fpo_ds.dist import Group


@cache
def registry() -> dict:
    """sae-lens's shipped registry of published SAEs (pretrained_saes.yaml), read without importing sae_lens.

    Importing sae_lens takes seconds; libyaml's C loader reads the 1.5 MB file in ~1 s where pure
    Python takes ~5 s.
    """
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader) if path.is_file() else {}


def registry_problems(release: str, sae_id: str) -> list[str]:
    """Empty if sae-lens knows (release, sae_id); otherwise messages naming the keys."""
    import difflib

    reg = registry()
    if not reg:
        return []  # sae-lens not installed: nothing to check against
    if release not in reg:
        close = difflib.get_close_matches(release, list(reg), n=1)
        return [
            f"sae.release: {release!r} is not a sae-lens release" + (f" (did you mean {close[0]}?)" if close else "")
        ]
    ids = [s["id"] for s in reg[release].get("saes", [])]
    if sae_id not in ids:
        close = difflib.get_close_matches(sae_id, ids, n=1)
        return [
            f"sae.sae_id: {sae_id!r} is not in release {release}" + (f" (did you mean {close[0]}?)" if close else "")
        ]
    return []


def registry_entry(release: str, sae_id: str) -> dict | None:
    """The registry's entry for (release, sae_id), or None."""
    for entry in registry().get(release, {}).get("saes", []):
        if entry["id"] == sae_id:
            return entry
    return None


def load_sae(path: str | None = None, release: str | None = None, sae_id: str | None = None, dtype: str = "float32"):
    """A frozen sae-lens SAE on CPU: a `save_model` directory, or a published one (release, sae_id).

    sae-lens must be imported before any deepspeed.zero.Init in the process (it fails after one).
    """
    from sae_lens import SAE

    if path:
        if not (Path(path) / "cfg.json").is_file():
            raise FileNotFoundError(
                f"sae.path: {path} has no cfg.json; expected a directory written by sae-lens `save_model`"
            )
        sae = SAE.load_from_disk(path, device="cpu", dtype=dtype)
    else:
        from fpo_ds import hub

        with hub.named("sae.release/sae.sae_id", f"{release} {sae_id}", "sae.path=<sae-lens save_model directory>"):
            sae = SAE.from_pretrained(release, sae_id, device="cpu", dtype=dtype)
    sae.requires_grad_(False)
    sae.eval()
    return sae


def hook_layer(sae, source: str = "sae") -> int:
    """Decoder block L whose output the SAE reads (`blocks.{L}.hook_resid_post`)."""
    name = sae.cfg.metadata.hook_name or ""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or parts[2] != "hook_resid_post" or not parts[1].isdigit():
        raise ValueError(
            f"{source}: SAE hook {name!r} is not a residual-stream site blocks.L.hook_resid_post; "
            "FPO reads the output of decoder block L"
        )
    return int(parts[1])


def check_against_model(sae, model_config, source: str = "sae") -> int:
    """Errors for an SAE that cannot read this model; returns its layer."""
    layer = hook_layer(sae, source)
    problems = []
    if sae.cfg.d_in != model_config.hidden_size:
        problems.append(f"SAE d_in {sae.cfg.d_in} != model hidden_size {model_config.hidden_size}")
    if layer >= model_config.num_hidden_layers:
        problems.append(f"SAE layer {layer} is beyond the model's {model_config.num_hidden_layers} blocks")
    if problems:
        raise ValueError(f"{source}: {'; '.join(problems)}. Pick the SAE trained on this model's residual stream")
    return layer


def sharded_encoder(sae_cfg, model_config, group: Group, device):
    """Load the recipe's SAE, check it fits the model, keep only this rank's slice. Returns (encoder, layer)."""
    from fpo_ds.encoder import ShardedEncoder

    sae = load_sae(sae_cfg.path, sae_cfg.release, sae_cfg.sae_id)
    source = f"sae ({sae_cfg.path or f'{sae_cfg.release}/{sae_cfg.sae_id}'})"
    layer = check_against_model(sae, model_config, source)
    if sae_cfg.k > sae.cfg.d_sae:
        raise ValueError(f"sae.k: {sae_cfg.k} exceeds the SAE width d_sae={sae.cfg.d_sae}")
    encoder = ShardedEncoder(sae, group, device)
    del sae  # the full SAE is dropped: only the slice stays resident
    return encoder, layer
