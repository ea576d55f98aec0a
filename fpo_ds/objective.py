"""Choose the loss once at set-up: recipe loss section -> one function of the step's outputs.

Each objective takes the policy's per-sequence outputs, the reference's (live engine or offline
cache; None for SFT/SimPO) and, for FPO, the policy's pooled SAE features, and returns
losses.LossOut. Sequences are ordered (chosen rows; rejected rows), so `_halves` splits them
into pairs. What a method needs (a reference, TDPO's KL head, SAE features) comes from the
recipe's loss section (config.METHOD_NEEDS) and travels with the run's Objective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from fpo_ds import losses as L
from fpo_ds.data import Batch
from fpo_ds.model import RefOut, SeqOut, sequence_logps

RefKind = Literal["none", "live", "offline"]  # no reference, a frozen model run each step, or the cache


Loss = Callable[[SeqOut, "RefOut | None", "torch.Tensor | None"], L.LossOut]  # (policy, reference, features)


class Objective(NamedTuple):
    """The run's loss and what it needs: built once at set-up; every module asks it, never the method name."""

    fn: Loss
    ref_kind: RefKind
    needs_kl: bool
    needs_features: bool


class LiveReference:
    """The reference model run beside the policy each step (no gradients).

    A frozen engine of its own; or, with LoRA (`adapters_off`), the policy's engine with its
    adapters switched off: the base model, without a second copy of its weights.
    """

    def __init__(self, engine, needs_kl: bool, adapters_off: bool = False):
        self.engine, self.needs_kl, self.adapters_off = engine, needs_kl, adapters_off

    def __call__(self, batch: Batch) -> RefOut:
        from fpo_ds import lora

        base = lora.adapters_off(self.engine.module) if self.adapters_off else contextlib.nullcontext()
        with torch.no_grad(), base:
            out = sequence_logps(self.engine, batch, keep_hidden=self.needs_kl)
        return RefOut(out.sum_logps, out.sum_logps / out.n_tokens, out.ref_head)


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = x.shape[0] // 2
    return x[:b], x[b:]


def build(loss_cfg, k: int = 50, feature_weights: torch.Tensor | None = None) -> Objective:
    """The recipe's objective; `k` and `feature_weights` (d_sae,) matter for fpo only."""
    method, beta, alpha = loss_cfg.method, loss_cfg.resolved_beta, loss_cfg.alpha

    def sft(pol: SeqOut, ref: RefOut | None, features=None) -> L.LossOut:
        mean_c, _ = _halves(pol.sum_logps / pol.n_tokens)
        zero = torch.zeros_like(mean_c).detach()
        return L.LossOut(L.sft(mean_c), zero, zero)

    def dpo(pol: SeqOut, ref: RefOut, features=None) -> L.LossOut:
        return L.dpo(*_halves(pol.sum_logps), *_halves(ref.sum_logps), beta)

    def ipo(pol: SeqOut, ref: RefOut, features=None) -> L.LossOut:
        return L.ipo(*_halves(pol.sum_logps), *_halves(ref.sum_logps), *_halves(pol.n_tokens), beta)

    def simpo(pol: SeqOut, ref: RefOut | None, features=None) -> L.LossOut:
        return L.simpo(*_halves(pol.sum_logps / pol.n_tokens), beta, loss_cfg.gamma_beta_ratio)

    def tdpo(pol: SeqOut, ref: RefOut, features=None) -> L.LossOut:
        kl = pol.kl  # computed in the policy's forward from ref.head (model.sequence_logps)
        version = 1 if method == "tdpo1" else 2
        out = L.tdpo(*_halves(pol.sum_logps), *_halves(ref.sum_logps), *_halves(kl), beta, alpha, version)
        kl_c, kl_r = _halves(kl.detach())
        return out._replace(extra={"tdpo/seq_kl_chosen": kl_c, "tdpo/seq_kl_rejected": kl_r})

    def fpo(pol: SeqOut, ref: RefOut, features: torch.Tensor) -> L.LossOut:
        d = L.feature_mse(features, ref.feat_idx, ref.feat_val, k, feature_weights)
        mean = pol.sum_logps / pol.n_tokens
        return L.fpo(*_halves(mean), *_halves(ref.mean_logps), *_halves(d), beta, alpha)

    fns = {"sft": sft, "dpo": dpo, "ipo": ipo, "simpo": simpo, "tdpo1": tdpo, "tdpo2": tdpo, "fpo": fpo}
    return Objective(fns[method], loss_cfg.ref_kind, loss_cfg.needs_kl, loss_cfg.needs_features)


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
