"""Fault injection for the fault tests: one switch, the environment variable FPO_DS_FAULT.

    FPO_DS_FAULT="nan_loss@3,4;nan_grad@5;die_in_save@4"

  nan_loss@STEPS     rank 1 (rank 0 in a 1-rank run) makes its loss NaN at those optimizer steps
  nan_grad@STEPS     the same rank makes its gradients NaN (the loss stays finite)
  die_in_save@STEP   every rank exits abruptly (like kill -9) inside the checkpoint save of that step
  fail@STEP          the same rank raises an error as that step starts (one rank fails, its peers wait)

Unset (always, outside tests) it does nothing. Steps count from 1, as in the logs.

A second variable records what the data order gave: FPO_DS_TRACE_PAIRS=DIR makes every rank
append {"step", "rank", "ids"} (the example ids it trained) to DIR/rank<R>.jsonl at each step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from fpo_ds import dist

Poison = Literal["loss", "gradient"]
VAR = "FPO_DS_FAULT"
TRACE = "FPO_DS_TRACE_PAIRS"
KINDS = ("nan_loss", "nan_grad", "die_in_save", "fail")


def _steps(kind: str) -> set[int]:
    out: set[int] = set()
    for item in filter(None, (x.strip() for x in os.environ.get(VAR, "").split(";"))):
        name, _, steps = item.partition("@")
        if name not in KINDS:
            raise ValueError(f"{VAR}: unknown fault {name!r} in {os.environ[VAR]!r} (known: {', '.join(KINDS)})")
        if name == kind:
            out |= {int(s) for s in steps.split(",") if s.strip()}
    return out


def poison(step: int) -> Poison | None:
    """What to poison on this rank at optimizer step `step` (1-based), if anything (or fail here)."""
    if dist.rank() != min(1, dist.world_size() - 1):
        return None
    if step in _steps("fail"):
        raise OSError(f"{VAR}: injected failure of rank {dist.rank()} at step {step} (as a read error would)")
    if step in _steps("nan_grad"):
        return "gradient"
    return "loss" if step in _steps("nan_loss") else None


def maybe_die_in_save(step: int) -> None:
    if step in _steps("die_in_save"):
        os._exit(137)


def trace_pairs(step: int, ids: list[int]) -> None:
    """Under FPO_DS_TRACE_PAIRS, record the example ids this rank trains at optimizer step `step` (1-based)."""
    if out := os.environ.get(TRACE):
        with open(Path(out) / f"rank{dist.rank()}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "rank": dist.rank(), "ids": ids}) + "\n")
