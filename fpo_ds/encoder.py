"""The sharded SAE encoder: this rank's slice of W_enc, the group's collectives, pooled features.

Features [lo, hi) of d_sae live on each rank of a shard group (`sae.shard_group`); a pooled
call gathers the group's response tokens, encodes them against the local slice, and sends each
rank its rows' slices back (all-to-all). Loading and checking the SAE is sae.py's job.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fpo_ds import metrics
from fpo_ds.dist import Group


def _split(d_sae: int, parts: int, index: int) -> tuple[int, int, int]:
    """Equal-width slices (the last one padded): returns (lo, hi, width)."""
    width = -(-d_sae // parts)
    lo = min(index * width, d_sae)
    return lo, min(lo + width, d_sae), width


# The group's collectives go through deepspeed.comm, so DeepSpeed's comms logger (the JSON's
# "comms_logger" section) counts them beside ZeRO's own, under these names.
GATHER_LOG, ALL_TO_ALL_LOG, TOPK_LOG = "sae_gather", "sae_all_to_all", "sae_topk_gather"


def _gather(x: torch.Tensor, group: Group, log_name: str) -> torch.Tensor:
    """(N, d) from each rank of the group -> (G, N, d), in group order."""
    import deepspeed.comm as dcomm

    out = [torch.empty_like(x) for _ in range(group.size)]
    dcomm.all_gather(out, x.contiguous(), group=group.handle, log_name=log_name)
    return torch.stack(out)


def _exchange(x: torch.Tensor, group: Group, log_name: str) -> torch.Tensor:
    """(G, m, f): piece j goes to group rank j; piece i of the result came from group rank i."""
    import deepspeed.comm as dcomm

    out = [torch.empty_like(x[0]) for _ in range(x.shape[0])]
    dcomm.all_to_all(out, [p.contiguous() for p in x.unbind(0)], group=group.handle, log_name=log_name)
    return torch.stack(out)


class _Collective(torch.autograd.Function):
    """The group's two differentiable collectives.

    "gather": (N, d) from each rank -> (G, N, d); its adjoint sends each piece home and sums.
    "exchange": all-to-all of (G, m, f), piece j to group rank j; it is its own adjoint.
    """

    @staticmethod
    def forward(ctx, x, group, kind):
        ctx.group, ctx.kind = group, kind
        return _gather(x, group, GATHER_LOG) if kind == "gather" else _exchange(x, group, ALL_TO_ALL_LOG)

    @staticmethod
    def backward(ctx, g):
        if ctx.kind == "gather":
            return _exchange(g, ctx.group, GATHER_LOG + "_grad").sum(0), None, None
        return _exchange(g, ctx.group, ALL_TO_ALL_LOG + "_grad"), None, None


_BITS = 2 ** torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(N, w) bool -> (N, ceil(w/8)) uint8."""
    n, w = mask.shape
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, -w % 8)).view(n, -1, 8)
    return (m * _BITS.to(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of pack_bits: (N, ceil(w/8)) uint8 -> (N, w) bool."""
    bits = (packed.unsqueeze(-1) & _BITS.to(packed.device)) != 0
    return bits.view(packed.shape[0], -1)[:, :width]


class _EncodePool(torch.autograd.Function):
    """Per-row sums of SAE features: (N, d_in) centred inputs, (N,) row ids -> (n_rows, width).

    Every supported activation is, away from its (measure-zero) kinks, the identity (times the
    TopK decoder-norm scale) on the features that fire and zero elsewhere; its threshold and the
    TopK cut-off carry no gradient (as in sae-lens). So backward needs only which features fired:
    kept as bits, N x width / 8 bytes, instead of N x width activations, and the encode matmul is
    not run again. Chunks of CHUNK_TOKENS bound the transient pre-activations.
    """

    @staticmethod
    def forward(ctx, xc, dest, enc, n_rows, clock):
        t0 = clock.start()
        out = torch.zeros(n_rows, enc.width, dtype=enc.dtype, device=xc.device)
        fired = [xc.new_zeros(0, -(-enc.width // 8), dtype=torch.uint8)]
        for i in range(0, xc.shape[0], enc.CHUNK_TOKENS):
            acts = enc.activate_(torch.addmm(enc.b_enc, xc[i : i + enc.CHUNK_TOKENS], enc.W_enc))
            out.index_add_(0, dest[i : i + enc.CHUNK_TOKENS], acts)
            if ctx.needs_input_grad[0]:  # not in the cache build or evaluation
                fired.append(pack_bits(acts > 0))
        ctx.save_for_backward(dest, torch.cat(fired))
        ctx.enc, ctx.clock = enc, clock
        clock.stop(t0)
        return out

    @staticmethod
    def backward(ctx, g):
        dest, packed = ctx.saved_tensors
        enc = ctx.enc
        t0 = ctx.clock.start()
        grad = torch.empty(dest.shape[0], enc.d_in, dtype=g.dtype, device=g.device)
        for i in range(0, dest.shape[0], enc.CHUNK_TOKENS):
            gc = g.index_select(0, dest[i : i + enc.CHUNK_TOKENS])
            gc.mul_(unpack_bits(packed[i : i + enc.CHUNK_TOKENS], enc.width))
            if enc.dec_norm is not None:
                gc.mul_(enc.dec_norm)
            torch.mm(gc, enc.W_enc.T, out=grad[i : i + enc.CHUNK_TOKENS])
        ctx.clock.stop(t0)
        return grad, None, None, None, None


class Encoded(NamedTuple):
    """One `ShardedEncoder.pooled` call's result and its costs."""

    features: torch.Tensor  # (rows, d_sae) mean SAE features over each row's response tokens
    comm_bytes: int  # received by this rank in the group's collectives, forward and (if any) backward
    clock: metrics.Clock  # encode time of this call; includes its backward once that has run


def comm_bytes_per_call(
    group: int, n_max: int, d_in: int, rows: int, width: int, item: int, feat_item: int, topk: int = 0
) -> int:
    """Bytes one rank receives in one forward `pooled` call (the backward moves the same again).

    token gather   (G-1) x n_max x (d_in+1) x item    response tokens + a row-id column, from each peer
    all-to-all     (G-1) x rows x width x feat_item    the pooled slices of my rows, from each peer
    TopK only      (G-1) x G*n_max x topk x feat_item  every gathered token's local top-k values
                   (forward only: the cut-off carries no gradient)
    """
    if group == 1:
        return 0
    return (group - 1) * (n_max * (d_in + 1) * item + rows * width * feat_item + group * n_max * topk * feat_item)


class ShardedEncoder:
    """This rank's slice of an SAE encoder: features [lo, hi) of d_sae, never the whole W_enc.

    The slices are spread over a shard group of G consecutive ranks (`sae.shard_group`: one node
    by default, so the traffic stays on the node's fast links at any node count). Each group
    encodes only its own ranks' response tokens; G = 1 keeps the whole encoder on every rank.
    """

    SUPPORTED = ("standard", "jumprelu", "topk")
    CHUNK_TOKENS = 1024  # tokens encoded at once: the transient is CHUNK_TOKENS x width values

    def __init__(self, sae, group: Group, device: torch.device | str = "cpu"):
        arch = sae.cfg.architecture()
        if arch not in self.SUPPORTED:
            raise ValueError(f"sae: architecture {arch!r} is not supported by the sharded encoder ({self.SUPPORTED})")
        self.arch, self.group, self.device = arch, group, device
        self.d_sae, self.d_in, self.dtype = sae.cfg.d_sae, sae.cfg.d_in, sae.W_enc.dtype
        self.lo, self.hi, self.width = _split(self.d_sae, group.size, group.rank)
        self.norm = sae.cfg.normalize_activations
        pad = self.width - (self.hi - self.lo)
        w = sae.W_enc.detach()[:, self.lo : self.hi]
        self.W_enc = torch.nn.functional.pad(w, (0, pad)).clone().to(device)
        self.b_enc = torch.nn.functional.pad(sae.b_enc.detach()[self.lo : self.hi], (0, pad)).clone().to(device)
        self.b_dec_in = (sae.b_dec.detach() * sae.cfg.apply_b_dec_to_input).clone().to(device)
        self.valid = torch.arange(self.width, device=device) < (self.hi - self.lo)
        self.threshold = self.dec_norm = None
        self.k = 0
        if arch == "jumprelu":
            self.threshold = torch.nn.functional.pad(sae.threshold.detach()[self.lo : self.hi], (0, pad)).to(device)
        if arch == "topk":
            self.k = sae.cfg.k
            if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
                norms = sae.W_dec.detach()[self.lo : self.hi].norm(dim=-1)
                self.dec_norm = torch.nn.functional.pad(norms, (0, pad)).to(device)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this rank holds, by name (all on `self.device`)."""
        ts = {"W_enc": self.W_enc, "b_enc": self.b_enc, "b_dec_in": self.b_dec_in, "valid": self.valid}
        ts |= {"threshold": self.threshold, "dec_norm": self.dec_norm}
        return {k: t for k, t in ts.items() if t is not None}

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for k, t in self.tensors().items() if k != "valid")

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """sae-lens's run-time input normalisation (per token, so every rank can apply it)."""
        if self.norm == "constant_norm_rescale":
            return x * (self.d_in**0.5) / x.norm(dim=-1, keepdim=True)
        if self.norm == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            return x / (x.std(dim=-1, keepdim=True) + 1e-5)
        return x  # "none"; "expected_average_only_in" is folded into W_enc by sae-lens at load

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input: normalised (per sae-lens), minus b_dec where the SAE applies it."""
        return self._normalise(x.to(self.dtype)) - self.b_dec_in

    def activate_(self, pre: torch.Tensor) -> torch.Tensor:
        """(N, width) pre-activations -> this rank's feature slice, exactly as sae-lens encodes it.

        Works in place on `pre` (no autograd). Collective in the group for TopK (the k-th largest
        value is over all slices).
        """
        # Padded columns have zero weights, bias and threshold: pre = 0 there, so they stay 0.
        if self.arch == "standard":
            return pre.relu_()
        if self.arch == "jumprelu":
            return pre.mul_(pre > self.threshold).relu_()  # mul_ by the mask: faster than masked_fill_ on CPU
        if self.dec_norm is not None:
            pre.mul_(self.dec_norm)
        pre.masked_fill_(~self.valid, float("-inf"))
        local_top = pre.topk(min(self.k, self.width), dim=-1).values
        everyone = _gather(local_top, self.group, TOPK_LOG) if self.group.size > 1 else local_top.unsqueeze(0)
        kth = everyone.permute(1, 0, 2).reshape(pre.shape[0], -1).topk(self.k, dim=-1).values[:, -1:]
        return pre.masked_fill_(pre < kth, 0.0).relu_()  # not mul_: padded columns hold -inf

    def pooled(self, h: torch.Tensor, mask: torch.Tensor, n_max: int | None = None) -> Encoded:
        """Collective in the group. Mean SAE features over response tokens. (rows, T, d_in), (rows, T).

        Every rank of the group passes its own rows (the same row count on all); gradients flow
        back to each rank's own `h`. `n_max`: the most response tokens any rank of the group has
        in this call, when the caller knows it from the data; otherwise one all-reduce finds it.
        """
        rows, G, clock = h.shape[0], self.group.size, metrics.Clock(self.device)
        sel = mask.bool()
        tokens = h[sel]  # (N, d_in), response tokens only
        row_of = torch.arange(rows, device=h.device).unsqueeze(1).expand_as(sel)[sel]
        counts = sel.sum(1).clamp(min=1).to(self.dtype).unsqueeze(1)
        if G == 1:
            sums = _EncodePool.apply(self.centred(tokens), row_of, self, rows, clock)
            return Encoded(sums[:, : self.d_sae] / counts, 0, clock)
        n_max = self._n_max(tokens.shape[0], h.device) if n_max is None else n_max
        pad = n_max - tokens.shape[0]
        if pad < 0:
            raise ValueError(f"ShardedEncoder.pooled: {tokens.shape[0]} response tokens exceed n_max={n_max}")
        # One gather carries each token and, in an extra column, the row it belongs to; padding
        # tokens go to a spare row `rows` that is dropped. Row ids must be exact in the column's
        # float type (bf16: up to 256), else the gather runs in fp32.
        exact = rows <= 2 / torch.finfo(tokens.dtype).eps  # integers are exact up to 2^(mantissa bits + 1)
        tokens = tokens if exact else tokens.float()
        row_col = torch.nn.functional.pad(row_of, (0, pad), value=rows).to(tokens.dtype).unsqueeze(1)
        packed = torch.cat([torch.nn.functional.pad(tokens, (0, 0, 0, pad)), row_col], 1)
        gathered = _Collective.apply(packed, self.group, "gather")  # (G, n_max, d_in + 1)
        all_rows = gathered[..., -1].detach().long()  # (G, n_max)
        dest = (all_rows + (rows + 1) * torch.arange(G, device=h.device).unsqueeze(1)).reshape(-1)
        xc = self.centred(gathered[..., :-1].reshape(-1, self.d_in))
        sums = _EncodePool.apply(xc, dest, self, G * (rows + 1), clock)
        sums = sums.reshape(G, rows + 1, self.width)[:, :rows]
        mine = _Collective.apply(sums, self.group, "exchange")  # (G, rows, width): slice i of my rows, from rank i
        full = mine.permute(1, 0, 2).reshape(rows, G * self.width)[:, : self.d_sae]
        args = (G, n_max, self.d_in, rows, self.width, packed.element_size(), sums.element_size())
        fwd = comm_bytes_per_call(*args, topk=min(self.k, self.width))
        bwd = comm_bytes_per_call(*args) if h.requires_grad else 0
        return Encoded(full / counts, fwd + bwd, clock)

    def _n_max(self, n: int, device) -> int:
        import deepspeed.comm as dcomm

        t = torch.tensor([n], device=device)
        dcomm.all_reduce(t, op=dcomm.ReduceOp.MAX, group=self.group.handle)
        return int(t.item())
