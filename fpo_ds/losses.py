"""Preference losses as pure tensor functions, one per method (formulas in each docstring).

Conventions: `b` pairs; `*_c` is the chosen response y_w, `*_r` the rejected y_l.
`sum_*` are summed response log-probs, `mean_*` are per-token means (sum / |y|).
Every preference loss is -log sigmoid(u), returned per pair, with detached rewards whose
difference is the implicit margin (rewards/margins in TRL's metric names).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class LossOut(NamedTuple):
    losses: Tensor  # (b,) per-pair loss, differentiable
    chosen_rewards: Tensor  # (b,) detached
    rejected_rewards: Tensor  # (b,) detached
    extra: dict | None = None  # method-specific per-pair metrics, e.g. fpo/feature_mse_chosen -> (b,)


# ----------------------------------------------------------------------------- log-probs

# Response positions per LM-head chunk. At Gemma-2's vocabulary (256,000) one chunk's fp32 logits
# are 1024 x 256000 x 4 B = 1 GiB, whatever the micro-batch and sequence length: the logits of all
# 2b x T positions of a micro-batch are never held.
LOGIT_CHUNK = 1024


def capped_logits(logits: Tensor, softcap: float | None) -> Tensor:
    """Gemma-2's final-logit softcapping, cap * tanh(logits / cap), in the logits' dtype; None: unchanged."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def head_outputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    softcap: float | None = None,
    ref: tuple[Tensor, Tensor] | None = None,
    gather_ref: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probs, KL to a reference, mean logits. (n, d), (V, d), (n,) -> (n,), (n,) or (0,), (n,); >= fp32.

    `hidden[i]` is the final hidden state (after the model's final norm) at the position that
    predicts `targets[i]`; its log-prob equals log_softmax(capped_logits(hidden @ weight.T))[i,
    targets[i]], with logits for `chunk` (default LOGIT_CHUNK) positions at a time, in forward
    and (recomputed) in backward. Given `ref` = (ref_hidden (n, d), ref_weight (V, d)), also
    each position's KL(pi_ref || pi_theta) over the full vocabulary, from the reference's own
    hidden states and head with the same softcapping, no gradient flowing to either (its
    gradient w.r.t. the policy's logits z is p_theta - p_ref); else an empty tensor.
    `gather_ref()` is entered around each pass that reads `ref_weight` (under ZeRO-3 it
    all-gathers that partitioned weight): once in forward, once in backward. Last, each
    position's mean logit over the vocabulary, without gradient. The mean logit
    is what TRL logs as `logits/chosen` and `logits/rejected` (averaged over response tokens); it
    costs one sum over each chunk's logits, which exist anyway.
    """
    ref_hidden, ref_weight = (ref[0].detach(), ref[1]) if ref is not None else (None, None)
    return _HeadLogps.apply(hidden, weight, targets, softcap, chunk or LOGIT_CHUNK, ref_hidden, ref_weight, gather_ref)


def _chunk_logits(hidden: Tensor, weight: Tensor, softcap: float | None) -> Tensor:
    """(c, d), (V, d) -> (c, V) logits in at least fp32, computed as the model's own forward computes them.

    The matmul and the softcapping run in the model's dtype (as in the Hugging Face forward) and
    the upcast comes after; in place, since the matmul's output is a fresh tensor.
    """
    z = F.linear(hidden, weight)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return _at_least_fp32(z)


def _logsumexp_(z: Tensor) -> Tensor:
    """Log-sum-exp over the last axis, overwriting z: no second (c, V) buffer. (c, V) -> (c,)."""
    m = z.amax(-1, keepdim=True)
    return z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))


def _kl_rows(ref_lp: Tensor, pol_lp: Tensor) -> Tensor:
    """sum_v p_ref (log p_ref - log p_theta). (c, V) log-probs, (c, V) -> (c,)."""
    return (ref_lp.exp() * (ref_lp - pol_lp)).sum(-1)


def _chunk_grad(hidden, weight, targets, lse, g, softcap, ref) -> Tensor:
    """Gradient of one chunk's loss w.r.t. its pre-softcap logits. (c, d), (V, d), (c,) x3 -> (c, V), >= fp32.

    d log p(y) / dz = onehot(y) - p and d KL / dz = p - p_ref (z: the softcapped logits), times
    the softcap's slope 1 - tanh^2. `ref` is None or (ref_hidden, ref_weight, ref_lse, g_kl).
    """
    z = F.linear(hidden, weight)
    t = z.div_(softcap).tanh_() if softcap is not None else None  # as the forward's _chunk_logits
    d = _at_least_fp32(z if t is None else t * softcap).sub_(lse[:, None]).exp_()  # p, from the forward's lse
    if ref is None:
        d.mul_(-g[:, None])
    else:
        ref_hidden, ref_weight, ref_lse, g_kl = ref
        p_ref = _chunk_logits(ref_hidden, ref_weight, softcap).sub_(ref_lse[:, None]).exp_()
        d.mul_((g_kl - g)[:, None]).sub_(p_ref.mul_(g_kl[:, None]))
    d.scatter_add_(1, targets[:, None], g[:, None])
    if t is not None:
        d.mul_(_at_least_fp32(t).square_().neg_().add_(1))  # t is not needed after this
    return d


def _chunks(n: int, size: int):
    return ((s, min(s + size, n)) for s in range(0, n, size))


class _HeadLogps(torch.autograd.Function):
    """Per-token log-probs (and the KL to a reference) from final hidden states, chunk by chunk.

    Saves the hidden states, the targets and one logsumexp per position, never logits: backward
    recomputes each chunk's logits and turns them into d_hidden and d_weight at once.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk, ref_hidden, ref_weight, gather_ref):
        n, acc = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        has_ref = ref_hidden is not None
        logps, lse = hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc)
        kl = hidden.new_zeros(n if has_ref else 0, dtype=acc)
        mean_logit = hidden.new_empty(n, dtype=acc)
        ref_lse = hidden.new_empty(n, dtype=acc) if has_ref else None
        with gather_ref() if has_ref else contextlib.nullcontext():
            for s, e in _chunks(n, chunk):
                z = _chunk_logits(hidden[s:e], weight, softcap)
                picked = z.gather(1, targets[s:e, None]).squeeze(1)
                mean_logit[s:e] = z.mean(-1)
                lse[s:e] = torch.logsumexp(z, -1) if has_ref else _logsumexp_(z)  # the KL needs z intact
                logps[s:e] = picked - lse[s:e]
                if has_ref:
                    zr = _chunk_logits(ref_hidden[s:e], ref_weight, softcap)
                    ref_lse[s:e] = torch.logsumexp(zr, -1)
                    kl[s:e] = _kl_rows(zr.sub_(ref_lse[s:e, None]), z.sub_(lse[s:e, None]))
        ctx.save_for_backward(hidden, weight, targets, lse, ref_hidden, ref_lse)
        ctx.softcap, ctx.chunk, ctx.ref_weight, ctx.gather_ref = softcap, chunk, ref_weight, gather_ref
        ctx.mark_non_differentiable(mean_logit, *([] if has_ref else [kl]))
        return logps, kl, mean_logit

    @staticmethod
    def backward(ctx, g_logps, g_kl, _g_mean_logit):
        hidden, weight, targets, lse, ref_hidden, ref_lse = ctx.saved_tensors
        has_ref = ref_hidden is not None
        d_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # Accumulated over chunks in the weight's dtype (as fused linear-cross-entropy kernels do).
        d_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        with ctx.gather_ref() if has_ref else contextlib.nullcontext():
            for s, e in _chunks(hidden.shape[0], ctx.chunk):
                ref = (ref_hidden[s:e], ctx.ref_weight, ref_lse[s:e], g_kl[s:e]) if has_ref else None
                d_z = _chunk_grad(hidden[s:e], weight, targets[s:e], lse[s:e], g_logps[s:e], ctx.softcap, ref)
                d_z = d_z.to(weight.dtype)
                if d_hidden is not None:
                    d_hidden[s:e] = d_z @ weight
                if d_weight is not None:
                    d_weight.addmm_(d_z.t(), hidden[s:e])
        return d_hidden, d_weight, None, None, None, None, None, None


# ----------------------------------------------------------------------------- SAE features


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the response tokens only. (b, T, d), (b, T) -> (b, d); divides by |y|."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def feature_mse(pol: Tensor, ref_idx: Tensor, ref_val: Tensor, k: int, weights: Tensor | None = None) -> Tensor:
    """D_FPO = (1/k) sum_{i in I_k} w_i (c_pol_i - c_ref_i)^2, I_k = topk(c_pol) U topk(c_ref).

    Args:
        pol: (b, d_sae) pooled policy features.
        ref_idx: (b, k_cache) long feature ids of the cached reference; -1 pads a short row.
        ref_val: (b, k_cache) their pooled values. Indices absent from the cache count as 0.
        k: top-k size taken from each side.
        weights: (d_sae,) per-feature constraint weights; None means all ones.

    Returns:
        (b,) per-pair feature distance.
    """
    valid = ref_idx >= 0
    idx = ref_idx.clamp(min=0)
    val = torch.where(valid, ref_val.to(pol.dtype), torch.zeros((), dtype=pol.dtype, device=pol.device))
    ref = torch.zeros_like(pol).scatter_add(1, idx, val)
    # Reference top-k among the valid cached entries (the cache need not be sorted).
    ranked = torch.where(valid, ref_val.float(), torch.full_like(ref_val.float(), float("-inf")))
    kr = min(k, ranked.shape[1])
    top_ref = ranked.topk(kr, dim=1)
    ref_sel = valid.gather(1, top_ref.indices).to(pol.dtype)
    in_union = torch.zeros_like(pol).scatter_add(1, idx.gather(1, top_ref.indices), ref_sel)
    pol_top = pol.detach().topk(min(k, pol.shape[1]), dim=1).indices
    in_union = in_union.scatter(1, pol_top, 1.0) > 0
    sq = (pol - ref) ** 2
    if weights is not None:
        sq = sq * weights.to(sq.dtype)
    return (sq * in_union).sum(1) / k


# ----------------------------------------------------------------------------- losses


def sft(mean_c: Tensor) -> Tensor:
    """Mean token NLL of the chosen response. (b,) -> (b,)."""
    return -mean_c


def dpo(sum_c: Tensor, sum_r: Tensor, ref_sum_c: Tensor, ref_sum_r: Tensor, beta: float) -> LossOut:
    """U = beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))], summed log-probs."""
    rc, rr = beta * (sum_c - ref_sum_c), beta * (sum_r - ref_sum_r)
    return LossOut(-F.logsigmoid(rc - rr), rc.detach(), rr.detach())


def ipo(
    sum_c: Tensor, sum_r: Tensor, ref_sum_c: Tensor, ref_sum_r: Tensor, n_c: Tensor, n_r: Tensor, beta: float
) -> LossOut:
    """(h - 1/(2 beta))^2 with length-normalised log-ratios h (TRL's and the IPO authors' form)."""
    hc, hr = (sum_c - ref_sum_c) / n_c, (sum_r - ref_sum_r) / n_r
    losses = (hc - hr - 1.0 / (2.0 * beta)) ** 2
    return LossOut(losses, beta * hc.detach(), beta * hr.detach())


def simpo(mean_c: Tensor, mean_r: Tensor, beta: float, gamma_beta_ratio: float) -> LossOut:
    """U = beta (mean log pi(y_w) - mean log pi(y_l)) - gamma, gamma = beta * gamma_beta_ratio."""
    rc, rr = beta * mean_c, beta * mean_r
    return LossOut(-F.logsigmoid(rc - rr - beta * gamma_beta_ratio), rc.detach(), rr.detach())


def tdpo(
    sum_c: Tensor,
    sum_r: Tensor,
    ref_sum_c: Tensor,
    ref_sum_r: Tensor,
    kl_c: Tensor,
    kl_r: Tensor,
    beta: float,
    alpha: float,
    version: int,
) -> LossOut:
    """TDPO-1: u_DPO - beta (D_l - D_w); TDPO-2: u_DPO - alpha (beta D_l - sg(beta D_w))."""
    rc, rr = beta * (sum_c - ref_sum_c), beta * (sum_r - ref_sum_r)
    if version == 1:
        u = rc - rr - beta * (kl_r - kl_c)
    elif version == 2:
        u = rc - rr - alpha * (beta * kl_r - (beta * kl_c).detach())
    else:
        raise ValueError(f"TDPO version must be 1 or 2, got {version}")
    return LossOut(-F.logsigmoid(u), rc.detach(), rr.detach())


def fpo(
    mean_c: Tensor,
    mean_r: Tensor,
    ref_mean_c: Tensor,
    ref_mean_r: Tensor,
    d_c: Tensor,
    d_r: Tensor,
    beta: float,
    alpha: float,
) -> LossOut:
    """U = beta (mean_c - mean_r) - gamma_ref - alpha (beta D_FPO(y_l) - sg(beta D_FPO(y_w))).

    gamma_ref = beta (ref_mean_c - ref_mean_r) comes from the offline cache.
    """
    rc, rr = beta * (mean_c - ref_mean_c), beta * (mean_r - ref_mean_r)
    u = rc - rr - alpha * (beta * d_r - (beta * d_c).detach())
    extra = {"fpo/feature_mse_chosen": d_c.detach(), "fpo/feature_mse_rejected": d_r.detach()}
    return LossOut(-F.logsigmoid(u), rc.detach(), rr.detach(), extra)
