"""The FPO feature reader: a model's pooled SAE features at block L, one call per micro-batch.

It owns the three parts of reading features: the residual tap on block L, this rank's slice of
the SAE encoder (sharded over its group), and the size of the group's token gather, which it
takes from the data (every rank knows every rank's pairs) instead of a collective.

    reader.arm()                  # before the forward pass whose block-L output is wanted
    logps = sequence_logps(engine, batch)
    feats = reader.read(batch, peers)   # (2b, d_sae) + bytes moved + encode time
"""

from __future__ import annotations

from fpo_ds.data import Batch, Pair, response_tokens
from fpo_ds.losses import IGNORE_INDEX
from fpo_ds.model import ResidualTap
from fpo_ds.sae import Encoded, ShardedEncoder


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
