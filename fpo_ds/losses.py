"""Preference losses as pure tensor functions, one per method (formulas in each docstring).

Conventions: `b` pairs; `*_c` is the chosen response y_w, `*_r` the rejected y_l.
`sum_*` are summed response log-probs, `mean_*` are per-token means (sum / |y|).
Every preference loss is -log sigmoid(u), returned per pair, with detached rewards whose
difference is the implicit margin (rewards/margins in TRL's metric names).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class LossOut(NamedTuple):
    losses: Tensor  # (b,) per-pair loss, differentiable
    chosen_rewards: Tensor  # (b,) detached
    rejected_rewards: Tensor  # (b,) detached
    extra: dict | None = None  # method-specific per-pair metrics, e.g. fpo/feature_mse_chosen -> (b,)


# ----------------------------------------------------------------------------- log-probs


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-prob of each next token. (b, T, V), (b, T) -> (b, T); 0 where labels is ignored.

    `labels[:, t]` is the token predicted at position t (already shifted by the caller).
    Uses gather - logsumexp so no second (b, T, V) log-softmax tensor is materialised.
    """
    mask = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    logits = _at_least_fp32(logits)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return logps * mask


def sequence_kl(ref_logits: Tensor, pol_logits: Tensor, mask: Tensor) -> Tensor:
    """D_SeqKL: sum over response tokens of KL(pi_ref || pi_theta). (b,T,V),(b,T,V),(b,T) -> (b,)."""
    ref_lp = F.log_softmax(_at_least_fp32(ref_logits), dim=-1)
    pol_lp = F.log_softmax(_at_least_fp32(pol_logits), dim=-1)
    kl = (ref_lp.exp() * (ref_lp - pol_lp)).sum(-1)
    return (kl * mask).sum(-1)


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
