"""DeepSpeed JSON and batch arithmetic: the recipe owns batch sizes, the JSON owns systems settings.

The JSON holds stage, precision, offload, clipping and communication knobs; the code fills the
batch keys from the recipe (gradient accumulation is derived, never set) and refuses a JSON that
sets them, so there is one source of truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
BUNDLED = Path(__file__).resolve().parent.parent / "ds_configs"


def accumulation_steps(global_batch: int, micro_batch: int, world: int) -> int:
    """Derived gradient accumulation; the error shows its arithmetic."""
    per_step = micro_batch * world
    if global_batch % per_step:
        raise ValueError(
            f"train.global_batch_size={global_batch} is not a multiple of "
            f"micro_batch_size*world_size = {micro_batch}*{world} = {per_step}; "
            f"pick a global batch that is, e.g. {per_step * max(1, round(global_batch / per_step))}"
        )
    return global_batch // per_step


def path(name: str) -> Path:
    """`deepspeed.config` (not `auto`) as given (relative to the working directory), else the bundled JSON.

    The fallback is ds_configs/ of this repository, by file name, so a recipe runs from any
    directory (multi-node launchers start the ranks elsewhere).
    """
    p = Path(name)
    if p.is_file():
        return p
    bundled = BUNDLED / p.name
    if not p.is_absolute() and bundled.is_file():
        return bundled
    names = ", ".join(sorted(x.name for x in BUNDLED.glob("*.json")))
    raise FileNotFoundError(f"deepspeed.config: {p} not found in {Path.cwd()}, nor bundled in {BUNDLED} ({names})")


AUTO = "auto"  # deepspeed.config value: fpo_ds.zero_auto picks stage, precision and buckets


def build(name: str, global_batch: int, micro_batch: int, world: int, systems: dict | None = None) -> dict:
    """Systems settings from the JSON (or `systems`, what `auto` chose) plus the batch keys from the recipe."""
    if systems is not None:
        return _with_batch(dict(systems), global_batch, micro_batch, world)
    p = path(name)
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed.config: {p} is not valid JSON: {e}") from None
    set_keys = [k for k in BATCH_KEYS if k in cfg]
    if set_keys:
        raise ValueError(
            f"{p}: sets {set_keys}; batch sizes come from the recipe (train.global_batch_size, "
            "train.micro_batch_size) only. Delete these keys from the JSON."
        )
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ValueError(f"{p}: remove '{key}'; the optimizer and LR schedule come from the recipe's train section")
    return _with_batch(cfg, global_batch, micro_batch, world)


def _with_batch(cfg: dict, global_batch: int, micro_batch: int, world: int) -> dict:
    cfg.update(
        train_batch_size=global_batch,
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=accumulation_steps(global_batch, micro_batch, world),
    )
    cfg.setdefault("steps_per_print", 10**9)  # we log ourselves
    return cfg


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def torch_dtype(cfg: dict) -> torch.dtype:
    if cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def offloads_optimizer(cfg: dict) -> bool:
    return cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
