"""Held-out metrics during training: a distributed forward pass over the held-out pairs, no gradient.

Every rank takes its share of the held-out pairs (data.eval_plan), runs the policy engine (under
ZeRO-3 every rank joins every forward), the reference the objective uses (live, or the offline
cache built for the held-out pairs) and, for FPO, the feature reader; the method's loss and
metrics are reduced over ranks and reported with TRL's `eval_` prefix, plus:

    eval_accuracy/length_normalised  share of pairs whose chosen response has the higher mean
                                     token log-prob under the policy (the paper's accuracy)
    eval_accuracy/dpo_reward         share whose DPO implicit reward log pi/pi_ref is higher for
                                     the chosen response (methods with a reference only)
    eval_time_s                      the pass's wall time

The pass touches neither the optimizer, the data order nor any random state, so a run with
held-out metrics trains the same numbers as one without, and resumes the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from fpo_ds import data, dist, features, metrics
from fpo_ds import model as M


class EvalSet(NamedTuple):
    pairs: list[data.Pair]
    reference: Callable[[data.Batch], M.RefOut] | None  # objective.LiveReference or cache.Reader; None: no reference
    source: str  # data.rows_source(...), for messages


def _accuracies(pol, ref, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-micro-batch sums of the paper's two accuracies. pol/ref: SeqOut/RefOut, (2b,); w (b,) 0/1."""
    b = w.shape[0]
    mean = pol.sum_logps / pol.n_tokens
    out = {"accuracy/length_normalised": ((mean[:b] > mean[b:]).float() * w).sum()}
    if ref is not None:
        r = pol.sum_logps - ref.sum_logps
        out["accuracy/dpo_reward"] = ((r[:b] > r[b:]).float() * w).sum()
    return out


def _micro(c, ev: EvalSet, positions: list[list[int]]) -> dict[str, torch.Tensor]:
    """One held-out micro-batch on this rank (padding slots, -1, repeat pair 0 with weight 0)."""
    rank = dist.rank()
    pick = lambda ix: [ev.pairs[max(j, 0)] for j in ix]  # noqa: E731
    batch = M.to_device(data.collate(pick(positions[rank]), c.tokenizer.pad_token_id), c.device)
    w = torch.tensor([float(j >= 0) for j in positions[rank]], device=c.device)
    ref = ev.reference(batch) if ev.reference is not None else None
    peers = [pick(ix) for ix in positions] if c.features else None
    fwd = features.forward(c.policy, batch, c.features, peers, ref.head if c.objective.needs_kl else None)
    out = c.objective.fn(fwd.out, ref, fwd.features)
    return metrics.pair_metrics(out, fwd.out, w) | _accuracies(fwd.out, ref, w)


def held_out_metrics(c) -> dict[str, float]:
    """Collective: the held-out metrics of the current policy (`c`: components.Components)."""
    ev = c.evaluation
    t0 = time.perf_counter()
    plan = data.eval_plan(len(ev.pairs), c.recipe.train.micro_batch_size, dist.world_size())
    was_training = c.policy.training
    c.policy.eval()
    try:
        with torch.no_grad():
            sums = [_micro(c, ev, positions) for positions in plan]
    finally:
        c.policy.train(was_training)
    out = {f"eval_{k}": v for k, v in metrics.reduce(sums, c.device).items()}
    out["eval_time_s"] = time.perf_counter() - t0
    return out
