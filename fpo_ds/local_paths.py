"""The recipe's local paths, checked without loading anything (`fpo-ds validate`).

A key that names a local file or directory must point at one that exists and looks right; a hub
id is reported as not checked (validate touches no network). Relative paths resolve from the
working directory, as they do when the recipe runs.
"""

from __future__ import annotations

from pathlib import Path

from fpo_ds import config as C
from fpo_ds import ds_config

# Where recipes/tiny.yaml's model and data come from (named in every missing-local-path error).
WORLD_HINT = (
    "recipes/tiny.yaml's model and data are written by `fpo-ds toy runs/world` (`make demo` writes its own "
    "worlds, runs/demo/seed<N>/world, e.g. model.name_or_path=runs/demo/seed1/world/model)"
)


def looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name" or "name"): absolute, ./ ../ ~, or more than one slash."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def _where(p: Path) -> str:
    return str(p) if p.is_absolute() else f"{p} (under {Path.cwd()})"


def _model(name: str, problems: list[str], notes: list[str]) -> None:
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            problems.append(f"model.name_or_path: {_where(p)} has no config.json (not a save_pretrained directory)")
    elif p.exists():
        problems.append(f"model.name_or_path: {_where(p)} is a file; pass a save_pretrained directory")
    elif looks_local(name):
        problems.append(
            f"model.name_or_path: {_where(p)} does not exist; pass a save_pretrained directory or a hub id. "
            + WORLD_HINT
        )
    else:
        notes.append(f"model.name_or_path: not checked: hub id {name}")


def _data(data_cfg, problems: list[str], notes: list[str]) -> None:
    """data.path, or each data.mix[i].path: a local file, glob or directory that exists, or a hub id."""
    import glob as globlib

    from fpo_ds import data_sources as S

    for src in S.sources(data_cfg):
        if src.path is None:
            continue
        key, k, p = f"{src.key}.path", S.kind(src.path), Path(src.path).expanduser()
        if k == "hub":
            notes.append(f"{key}: not checked: hub id {src.path}")
        elif k == "glob" and not globlib.glob(src.path, recursive=True):
            problems.append(f"{key}: the glob {src.path!r} matches no file under {Path.cwd()}")
        elif k == "file" and p.suffix not in S.LOCAL_BUILDERS:
            problems.append(
                f"{key}: {src.path!r} is neither an existing local file or directory nor a hub dataset name "
                "like HuggingFaceH4/ultrafeedback_binarized"
            )
        elif k == "file" and not p.is_file():
            problems.append(
                f"{key}: {_where(p)} does not exist; pass a .jsonl/.json/.parquet/.csv/.arrow file, a glob, "
                f"a save_to_disk directory or a hub dataset. {WORLD_HINT}"
            )


def _sae(sae: C.SAEConfig, problems: list[str], notes: list[str]) -> None:
    if sae.path:
        p = Path(sae.path).expanduser()
        if not (p / "cfg.json").is_file():
            what = "does not exist" if not p.exists() else "has no cfg.json"
            problems.append(f"sae.path: {_where(p)} {what}; pass a directory written by sae-lens `save_model`")
    elif sae.release:
        notes.append(f"sae.release/sae.sae_id: not checked: hub id {sae.release} {sae.sae_id} (in sae-lens's registry)")
    if sae.feature_weights and not Path(sae.feature_weights).expanduser().is_file():
        problems.append(f"sae.feature_weights: {_where(Path(sae.feature_weights))} does not exist")


def _cache(recipe: C.Recipe, problems: list[str], notes: list[str]) -> None:
    if not recipe.cache.dir:
        return
    p = Path(recipe.cache.dir).expanduser()
    if (p / "manifest.json").is_file():
        return
    if p.exists() and not p.is_dir():
        problems.append(f"cache.dir: {_where(p)} is a file; pass a directory")
    elif p.is_dir() and any(p.iterdir()):
        problems.append(f"cache.dir: {_where(p)} holds no manifest.json: not a finished cache; rebuild it there")
    else:
        notes.append(f"cache.dir: {_where(p)} not built yet (`fpo-ds build-cache` writes it; training reads it)")


def check(recipe: C.Recipe) -> tuple[list[str], list[str]]:
    """(problems, notes): what is missing or wrong locally, and what was not checked (hub ids, caches to come)."""
    problems: list[str] = []
    notes: list[str] = []
    _model(recipe.model.name_or_path, problems, notes)
    _data(recipe.data, problems, notes)
    if recipe.loss.needs_features or recipe.sae.path or recipe.sae.release:
        _sae(recipe.sae, problems, notes)
    _cache(recipe, problems, notes)
    if recipe.deepspeed.config != ds_config.AUTO:
        try:
            ds_config.path(recipe.deepspeed.config)
        except FileNotFoundError as e:
            problems.append(str(e))
    resume = recipe.output.resume
    if resume not in ("auto", "never") and not Path(resume).expanduser().is_dir():
        where = _where(Path(resume))
        problems.append(f"output.resume: {where} does not exist; pass a checkpoint directory, auto or never")
    return problems, notes
