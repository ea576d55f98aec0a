"""The FPO feature reader: a model's pooled SAE features at block L, one call per micro-batch.

It owns the three parts of reading features: the residual tap on block L, this rank's slice of
the SAE encoder (sharded over its group), and the size of the group's token gather, which it
takes from the data (every rank knows every rank's pairs) instead of a collective.

`forward` is the one place the sequence arm -> forward -> read is written; training, held-out
metrics and the cache build call it.
"""

from __future__ import annotations

from typing import NamedTuple

from fpo_ds.data import IGNORE_INDEX, Batch, Pair, response_tokens
from fpo_ds.encoder import Encoded, ShardedEncoder
from fpo_ds.model import RefHead, ResidualTap, SeqOut, sequence_logps


class FeatureReader:
    def __init__(self, module, layer: int, encoder: ShardedEncoder):
        self.tap, self.encoder = ResidualTap(module, layer), encoder

    @property
    def d_sae(self) -> int:
        return self.encoder.d_sae

    def arm(self) -> None:
        self.tap.arm()

    def read(self, batch: Batch, peers: list[list[Pair]] | None = None) -> Encoded:
        """Collective in the shard group. Features of the armed forward pass: (2b, d_sae) rows.

        `peers[r]`: the pairs rank r holds in this micro-batch (all ranks of the world), so the
        group's largest response-token count needs no collective; None finds it with one.
        """
        n_max = None
        if peers is not None:
            n_max = max(response_tokens(peers[r]) for r in self.encoder.group.ranks)
        return self.encoder.pooled(self.tap.take(), batch.labels != IGNORE_INDEX, n_max)

    def close(self) -> None:
        self.tap.remove()


class Forward(NamedTuple):
    """One forward pass: the per-sequence outputs and, with a feature reader, the pooled SAE features."""

    out: SeqOut
    sae: Encoded | None  # (2b, d_sae) features at the SAE's block, with the bytes moved and the encode time

    @property
    def features(self):
        return self.sae.features if self.sae is not None else None


def forward(engine, batch: Batch, reader: FeatureReader | None, peers=None, ref: RefHead | None = None) -> Forward:
    """`engine`'s forward over the batch (KL to `ref` for TDPO), reading its block-L features when `reader` is given.

    Collective in the reader's shard group. `peers`: as FeatureReader.read.
    """
    if reader is not None:
        reader.arm()
    out = sequence_logps(engine, batch, ref)
    return Forward(out, reader.read(batch, peers) if reader is not None else None)
