"""Step metrics: TRL's names, reduced across ranks, written by rank 0.

`metrics.jsonl` in the run directory always gets one JSON object per optimizer step
(`step`, `loss`, rewards/*, logps/*, lr, grad_norm, tokens_per_s, samples_per_s,
step_time_s, peak_mem_mib); TensorBoard and Weights & Biases (offline works) on request.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from fpo_ds import dist
from fpo_ds.losses import LossOut


def pair_metrics(out: LossOut, sum_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-micro-batch sums (reduced later). sum_logps: (2b,) chosen rows then rejected."""
    b = out.losses.shape[0]
    margins = out.chosen_rewards - out.rejected_rewards
    return {
        "loss": out.losses.detach().sum(),
        "rewards/chosen": out.chosen_rewards.sum(),
        "rewards/rejected": out.rejected_rewards.sum(),
        "rewards/margins": margins.sum(),
        "rewards/accuracies": (margins > 0).float().sum(),
        "logps/chosen": sum_logps[:b].detach().sum(),
        "logps/rejected": sum_logps[b:].detach().sum(),
        "pairs": torch.tensor(float(b), device=out.losses.device),
    } | {k: v.sum() for k, v in (out.extra or {}).items()}


def reduce(sums: list[dict[str, torch.Tensor]], device: str = "cpu") -> dict[str, float]:
    """Sum micro-batch sums over accumulation and ranks; divide all but `tokens` by the pair count."""
    keys = list(sums[0])
    # Summed where the tensors live: one device-to-host copy per step (tolist below), not one per metric.
    local = torch.stack([sum(s[k].detach().double() for s in sums) for k in keys]).to(device)
    if tdist.is_initialized():
        tdist.all_reduce(local)  # one small collective per step (on the accelerator for NCCL)
    totals = dict(zip(keys, local.tolist()))
    pairs, tokens = totals.pop("pairs"), totals.pop("tokens", None)
    means = {k: v / pairs for k, v in totals.items()}
    if tokens is not None:
        means["tokens"] = tokens  # a global count, not a mean
    return means


def step_metrics(
    sums: list[dict[str, torch.Tensor]],
    device: str,
    *,
    lr: float,
    grad_norm: float,
    seconds: float,
    global_batch: int,
    sae: list | None = None,
    cache_read_s: float | None = None,
) -> dict[str, float]:
    """One optimizer step's record: reduced pair metrics, throughput, and the step's costs.

    `sae`: the step's feature reads (sae.Encoded); their bytes are this rank's group traffic,
    forward and backward, and their clocks the encode time. `cache_read_s`: host time reading
    the offline cache.
    """
    m = reduce(sums, device) if sums else {"loss": float("nan"), "tokens": 0.0}
    if sae is not None:
        m["fpo/sae_comm_bytes_per_step"] = float(sum(e.comm_bytes for e in sae if e is not None))
        m["time/sae_encode_s"] = sum(e.clock.seconds() for e in sae if e is not None)
    if cache_read_s is not None:
        m["time/cache_read_s"] = cache_read_s
    tokens = m.pop("tokens")
    m.update(
        lr=lr,
        grad_norm=grad_norm,
        tokens_per_s=tokens / seconds,
        samples_per_s=global_batch / seconds,
        step_time_s=seconds,
        peak_mem_mib=peak_mem_mib(),
    )
    return m


def peak_mem_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Writer:
    """Rank-0 sink for step metrics (jsonl always; TensorBoard / W&B when asked)."""

    def __init__(self, out_dir: str, logging_cfg, total_steps: int, recipe_dict: dict):
        self.cfg, self.total, self.enabled = logging_cfg, total_steps, dist.rank() == 0
        self.t0, self.tb, self.wandb = time.time(), None, None
        if not self.enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(out_dir) / "metrics.jsonl", "a")
        if logging_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        if logging_cfg.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")  # set WANDB_MODE=online to sync
            self.wandb = wandb.init(project=logging_cfg.wandb_project, dir=out_dir, config=recipe_dict, resume="allow")

    def write(self, step: int, metrics: dict[str, float], first_step: int) -> None:
        if not self.enabled:
            return
        # Strict JSON: a skipped step's non-finite values are written as null.
        record = {"step": step, **{k: v if math.isfinite(v) else None for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if step % self.cfg.every == 0 or step == self.total:
            self._progress(step, metrics, first_step)

    def _progress(self, step: int, m: dict[str, float], first_step: int) -> None:
        done = step - first_step
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
        line = (
            f"step {step}/{self.total} loss {m['loss']:.4f} margin {m.get('rewards/margins', math.nan):.4f} "
            f"acc {m.get('rewards/accuracies', math.nan):.2f} lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s "
            f"eta {eta:.0f}s"
        )
        if self.cfg.progress_bar:
            width = 20
            filled = int(width * step / max(self.total, 1))
            line = f"[{'#' * filled}{'.' * (width - filled)}] " + line
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
