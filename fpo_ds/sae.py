"""SAE loading (sae-lens) and the registry check used by `fpo-ds validate`."""

from __future__ import annotations

import importlib.util
import time
from functools import cache
from pathlib import Path

import torch
import torch.distributed as tdist
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


# ----------------------------------------------------------------------------- loading


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


# ----------------------------------------------------------------------------- sharded encode


def _split(d_sae: int, world: int, rank: int) -> tuple[int, int, int]:
    """Equal-width slices (the last one padded): returns (lo, hi, width)."""
    width = -(-d_sae // world)
    lo = min(rank * width, d_sae)
    return lo, min(lo + width, d_sae), width


class _GatherRows(torch.autograd.Function):
    """all_gather of equal-shaped (N, d) -> (W, N, d); backward sends each piece home and sums."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
        tdist.all_gather(out, x.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx, g):
        pieces = [torch.empty_like(g[0]) for _ in range(g.shape[0])]
        tdist.all_to_all(pieces, [p.contiguous() for p in g.unbind(0)])
        return torch.stack(pieces).sum(0)


class _AllToAll(torch.autograd.Function):
    """(W, m, f): piece j goes to rank j; result piece i came from rank i. Self-adjoint."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x[0]) for _ in range(x.shape[0])]
        tdist.all_to_all(out, [p.contiguous() for p in x.unbind(0)])
        return torch.stack(out)

    @staticmethod
    def backward(ctx, g):
        return _AllToAll.apply(g)


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
    def forward(ctx, xc, dest, enc, n_rows):
        out = torch.zeros(n_rows, enc.width, dtype=enc.dtype, device=xc.device)
        fired = [xc.new_zeros(0, -(-enc.width // 8), dtype=torch.uint8)]
        for i in range(0, xc.shape[0], enc.CHUNK_TOKENS):
            acts = enc.activate_(torch.addmm(enc.b_enc, xc[i : i + enc.CHUNK_TOKENS], enc.W_enc))
            out.index_add_(0, dest[i : i + enc.CHUNK_TOKENS], acts)
            if ctx.needs_input_grad[0]:  # not in the cache build or evaluation
                fired.append(pack_bits(acts > 0))
        ctx.save_for_backward(dest, torch.cat(fired))
        ctx.enc = enc
        return out

    @staticmethod
    def backward(ctx, g):
        dest, packed = ctx.saved_tensors
        enc = ctx.enc
        t0 = enc.clock.start()
        grad = torch.empty(dest.shape[0], enc.d_in, dtype=g.dtype, device=g.device)
        for i in range(0, dest.shape[0], enc.CHUNK_TOKENS):
            gc = g.index_select(0, dest[i : i + enc.CHUNK_TOKENS])
            gc.mul_(unpack_bits(packed[i : i + enc.CHUNK_TOKENS], enc.width))
            if enc.dec_norm is not None:
                gc.mul_(enc.dec_norm)
            torch.mm(gc, enc.W_enc.T, out=grad[i : i + enc.CHUNK_TOKENS])
        enc.clock.stop(t0)
        return grad, None, None, None


class Clock:
    """Sums the time of marked spans without syncing the device in the step (CUDA events on GPU)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.spans: list = []
        self.host = 0.0

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, t0) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.spans.append((t0, ev))
            if len(self.spans) > 256:  # a caller that never takes (e.g. the cache build): fold
                self.host += self.take()
        else:
            self.host += time.perf_counter() - t0

    def take(self) -> float:
        """Seconds since the last take (waits for the device on GPU: call once per step)."""
        if self.spans:
            self.spans[-1][1].synchronize()
        total = self.host + sum(a.elapsed_time(b) for a, b in self.spans) / 1000.0
        self.spans, self.host = [], 0.0
        return total


class ShardedEncoder:
    """This rank's slice of an SAE encoder: features [lo, hi) of d_sae, never the whole W_enc.

    `pooled(h, mask)` is collective. Per call and rank it moves
        all_gather:  (W-1) * N_max * (d_in+1) values in (response-token hidden states + row ids)
        all_to_all:  2 * (W-1) * rows * width values   (pooled feature slices out and back)
    and the same again in backward. `bytes_per_call` reports the last call's volume.
    """

    SUPPORTED = ("standard", "jumprelu", "topk")
    CHUNK_TOKENS = 1024  # tokens encoded at once: the transient is CHUNK_TOKENS x width values

    def __init__(self, sae, rank: int, world: int, device: torch.device | str = "cpu"):
        arch = sae.cfg.architecture()
        if arch not in self.SUPPORTED:
            raise ValueError(f"sae: architecture {arch!r} is not supported by the sharded encoder ({self.SUPPORTED})")
        self.arch, self.world, self.rank = arch, world, rank
        self.d_sae, self.d_in, self.dtype = sae.cfg.d_sae, sae.cfg.d_in, sae.W_enc.dtype
        self.lo, self.hi, self.width = _split(self.d_sae, world, rank)
        self.norm = sae.cfg.normalize_activations
        pad = self.width - (self.hi - self.lo)
        w = sae.W_enc.detach()[:, self.lo : self.hi]
        self.W_enc = torch.nn.functional.pad(w, (0, pad)).clone().to(device)
        self.b_enc = torch.nn.functional.pad(sae.b_enc.detach()[self.lo : self.hi], (0, pad)).clone().to(device)
        self.b_dec_in = (sae.b_dec.detach() * sae.cfg.apply_b_dec_to_input).clone().to(device)
        self.valid = torch.arange(self.width, device=device) < (self.hi - self.lo)
        self.threshold = self.dec_norm = None
        if arch == "jumprelu":
            self.threshold = torch.nn.functional.pad(sae.threshold.detach()[self.lo : self.hi], (0, pad)).to(device)
        if arch == "topk":
            self.k = sae.cfg.k
            if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
                self.dec_norm = torch.nn.functional.pad(sae.W_dec.detach()[self.lo : self.hi].norm(dim=-1), (0, pad))
        self.bytes_per_call = 0
        self.clock = Clock(device)  # encode time, forward and backward (`time/sae_encode_s`)

    def resident_bytes(self) -> int:
        ts = [self.W_enc, self.b_enc, self.b_dec_in, self.threshold, self.dec_norm]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

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

        Works in place on `pre` (no autograd). Collective for TopK (the k-th largest value is global).
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
        everyone = _GatherRows.apply(local_top) if self.world > 1 else local_top.unsqueeze(0)
        kth = everyone.permute(1, 0, 2).reshape(pre.shape[0], -1).topk(self.k, dim=-1).values[:, -1:]
        return pre.masked_fill_(pre < kth, 0.0).relu_()  # not mul_: padded columns hold -inf

    def _encode_sum(self, x: torch.Tensor, dest: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Per-row sums of this slice's features. (N, d_in), (N,) -> (n_rows, width)."""
        t0 = self.clock.start()
        out = _EncodePool.apply(self.centred(x), dest, self, n_rows)
        self.clock.stop(t0)
        return out

    def pooled(self, h: torch.Tensor, mask: torch.Tensor, n_max: int | None = None) -> torch.Tensor:
        """Collective. Mean SAE features over response tokens. (rows, T, d_in), (rows, T) -> (rows, d_sae).

        Every rank passes its own rows (same row count on all ranks); gradients flow back to
        each rank's own `h`. `n_max`: the most response tokens any rank has in this call, when
        the caller knows it from the data (the trainer does); otherwise one all-reduce finds it.
        """
        rows = h.shape[0]
        sel = mask.bool()
        tokens = h[sel]  # (N, d_in), response tokens only
        row_of = torch.arange(rows, device=h.device).unsqueeze(1).expand_as(sel)[sel]
        counts = sel.sum(1).clamp(min=1).to(self.dtype)
        if self.world == 1:
            return self._encode_sum(tokens, row_of, rows)[:, : self.d_sae] / counts.unsqueeze(1)
        if n_max is None:
            n = torch.tensor([tokens.shape[0]], device=h.device)
            tdist.all_reduce(n, op=tdist.ReduceOp.MAX)
            n_max = int(n.item())
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
        gathered = _GatherRows.apply(packed)  # (W, n_max, d_in + 1)
        all_rows = gathered[..., -1].detach().long()  # (W, n_max)
        dest = (all_rows + (rows + 1) * torch.arange(self.world, device=h.device).unsqueeze(1)).reshape(-1)
        sums = self._encode_sum(gathered[..., :-1].reshape(-1, self.d_in), dest, self.world * (rows + 1))
        sums = sums.reshape(self.world, rows + 1, self.width)[:, :rows]
        mine = _AllToAll.apply(sums)  # (W, rows, width): slice i of my rows, from rank i
        full = mine.permute(1, 0, 2).reshape(rows, self.world * self.width)[:, : self.d_sae]
        item = packed.element_size()
        self.bytes_per_call = (self.world - 1) * (
            n_max * (self.d_in + 1) * item + 2 * rows * self.width * sums.element_size()
        )
        return full / counts.unsqueeze(1)


def sharded_encoder(sae_cfg, model_config, rank: int, world: int, device) -> tuple[ShardedEncoder, int]:
    """Load the recipe's SAE, check it fits the model, keep only this rank's slice. Returns (encoder, layer)."""
    sae = load_sae(sae_cfg.path, sae_cfg.release, sae_cfg.sae_id)
    source = f"sae ({sae_cfg.path or f'{sae_cfg.release}/{sae_cfg.sae_id}'})"
    layer = check_against_model(sae, model_config, source)
    if sae_cfg.k > sae.cfg.d_sae:
        raise ValueError(f"sae.k: {sae_cfg.k} exceeds the SAE width d_sae={sae.cfg.d_sae}")
    encoder = ShardedEncoder(sae, rank, world, device)
    del sae  # the full SAE is dropped: only the slice stays resident
    return encoder, layer


def load_feature_weights(path: str | None, d_sae: int, device) -> torch.Tensor | None:
    """Per-feature constraint weights (d_sae,) from a .pt or .safetensors file (key 'weights')."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sae.feature_weights: {p} not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        w = load_file(str(p)).get("weights")
    else:
        w = torch.load(p, map_location="cpu")
    if not isinstance(w, torch.Tensor) or w.shape != (d_sae,):
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"sae.feature_weights: {p} must hold one tensor of shape ({d_sae},), got {got}")
    return w.float().to(device)
