"""Rank discovery and rank-0 printing.

Under torchrun and the `deepspeed` launcher the usual variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are set; a plain `python` run is world size 1.
"""

from __future__ import annotations

import datetime
import os
import sys


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def log(*msg: object) -> None:
    """Print on rank 0 only (the one place the package prints)."""
    if rank() == 0:
        print(*msg, flush=True)


def log_all(*msg: object) -> None:
    """Print on every rank, prefixed with the rank (for errors that concern one rank)."""
    print(f"[rank {rank()}]", *msg, file=sys.stderr, flush=True)


def init(timeout_minutes: int) -> None:
    """Start torch.distributed through DeepSpeed with a collective timeout (no endless hangs)."""
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(
        dist_init_required=True, timeout=datetime.timedelta(minutes=timeout_minutes), auto_mpi_discovery=False
    )
