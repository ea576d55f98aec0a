"""File checksums: the one sha256 reader behind every manifest (checkpoints, the reference cache, tokenized data).

`checksums` spreads the hashing of a file list over the ranks (each hashes every world-th
file, largest first) and hands every rank the whole table: a checkpoint of N GB costs each rank
about N / world GB of reading, at save and again at resume.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checksums(root: Path, names: list[str]) -> dict[str, str]:
    """Collective when torch.distributed is up: {name: sha256 of root/name} for every name, on every rank.

    A file that cannot be read hashes to "missing".
    """
    import torch.distributed as tdist

    distributed = tdist.is_available() and tdist.is_initialized()
    rank, world = (tdist.get_rank(), tdist.get_world_size()) if distributed else (0, 1)
    by_size = sorted(names, key=lambda n: (-(root / n).stat().st_size if (root / n).is_file() else 0, n))
    mine = {}
    for name in by_size[rank::world]:
        try:
            mine[name] = sha256(root / name)
        except OSError:
            mine[name] = "missing"
    if not distributed or world == 1:
        return mine
    parts: list = [None] * world
    tdist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}
