"""Step metrics: TRL's names, reduced across ranks, written by rank 0.

`metrics.jsonl` in the run directory always gets one JSON object per optimizer step
(`step`, `loss`, rewards/*, logps/*, logits/*, lr, grad_norm, num_tokens, epoch, step_tokens,
tokens_per_s, samples_per_s, step_time_s, peak_mem_mib); TensorBoard and Weights & Biases (offline
works) on request.
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


def pair_metrics(out: LossOut, pol, weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-micro-batch sums (reduced later). pol: the policy's model.SeqOut, (2b,) chosen rows then rejected.

    `logits/*` are TRL's: the mean logit over the vocabulary and the response tokens (token-weighted).
    `weight` (b,) of 0/1 leaves pairs out (the padding of a held-out pass); None counts every pair.
    """
    b = out.losses.shape[0]
    w = torch.ones(b, device=out.losses.device) if weight is None else weight.to(out.losses.device)
    w2 = torch.cat([w, w])
    margins = out.chosen_rewards - out.rejected_rewards
    sums = {
        "loss": out.losses.detach() * w,
        "rewards/chosen": out.chosen_rewards * w,
        "rewards/rejected": out.rejected_rewards * w,
        "rewards/margins": margins * w,
        "rewards/accuracies": (margins > 0).float() * w,
        "logps/chosen": pol.sum_logps[:b].detach() * w,
        "logps/rejected": pol.sum_logps[b:].detach() * w,
    } | {k: v * w for k, v in (out.extra or {}).items()}
    sums = {k: v.sum() for k, v in sums.items()}
    sums.update(
        {
            "logits/chosen": (pol.sum_mean_logits * w2)[:b].sum(),
            "logits/rejected": (pol.sum_mean_logits * w2)[b:].sum(),
            TOKEN_COUNTS["logits/chosen"]: (pol.n_tokens * w2)[:b].sum().detach(),
            TOKEN_COUNTS["logits/rejected"]: (pol.n_tokens * w2)[b:].sum().detach(),
            "pairs": w.sum(),
        }
    )
    return sums


# Metrics averaged over response tokens rather than pairs: their sums' token counts (reduced alongside).
TOKEN_COUNTS = {"logits/chosen": "_response_tokens/chosen", "logits/rejected": "_response_tokens/rejected"}


def reduce(sums: list[dict[str, torch.Tensor]], device: str = "cpu") -> dict[str, float]:
    """Sum micro-batch sums over accumulation and ranks; divide all but `tokens` by the pair count."""
    keys = list(sums[0])
    # Summed where the tensors live: one device-to-host copy per step (tolist below), not one per metric.
    local = torch.stack([sum(s[k].detach().double() for s in sums) for k in keys]).to(device)
    if tdist.is_initialized():
        tdist.all_reduce(local)  # one small collective per step (on the accelerator for NCCL)
    totals = dict(zip(keys, local.tolist()))
    pairs, tokens = totals.pop("pairs"), totals.pop("tokens", None)
    counts = {k: totals.pop(n) for k, n in TOKEN_COUNTS.items() if n in totals}
    means = {k: v / (counts[k] if k in counts else pairs) for k, v in totals.items()}
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

    `sae`: the step's feature reads (encoder.Encoded); their bytes are this rank's group traffic,
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
        step_tokens=tokens,
        lr=lr,
        grad_norm=grad_norm,
        tokens_per_s=tokens / seconds,
        samples_per_s=global_batch / seconds,
        step_time_s=seconds,
        peak_mem_mib=peak_mem_mib(),
    )
    return m


def last_eval(metrics_path: Path, up_to: int | None = None) -> dict:
    """The last metrics.jsonl record with held-out (`eval_*`) metrics, at or before step `up_to` (None: any).

    Reduced to those metrics and its step; {} if none. A torn line (a crash mid-write) is skipped.
    """
    found: dict = {}
    if Path(metrics_path).is_file():
        for line in Path(metrics_path).read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if any(k.startswith("eval_") for k in rec) and (up_to is None or rec.get("step", 0) <= up_to):
                found = rec
    return {k: v for k, v in found.items() if k.startswith("eval_") or k == "step"}


def eval_line(step: int, m: dict[str, float]) -> str:
    """The progress line of a held-out pass."""
    shown = [("eval_loss", "loss", ".4f"), ("eval_rewards/accuracies", "reward acc", ".3f")]
    shown += [("eval_accuracy/length_normalised", "length-normalised acc", ".3f")]
    shown += [("eval_fpo/feature_mse_chosen", "feature mse chosen", ".4g")]
    text = ", ".join(f"{label} {m[k]:{fmt}}" for k, label, fmt in shown if k in m)
    return f"held-out at step {step}: {text} ({m['eval_time_s']:.1f} s)"


def run_summary(history: list[dict], wall_s: float, checkpoint: Path | None, out) -> str:
    """One paragraph at the end of a run: what TRL prints as train_runtime & co, plus where the weights are."""
    steps = len(history)
    if not steps:
        return f"run summary: no step ran in this launch ({wall_s:.0f} s); output in {out.dir}"
    tokens = sum(h["step_tokens"] for h in history)
    train_s = sum(h["step_time_s"] for h in history)
    losses = [h["loss"] for h in history if math.isfinite(h["loss"])]
    where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint written in this launch"
    if checkpoint is None and not out.save_final:
        where += " (output.save_final=false)"
    return (
        f"run summary: {steps} steps (to step {history[-1]['step']}) in {wall_s:.0f} s wall, {train_s:.0f} s in steps; "
        f"{steps / wall_s:.3g} steps/s, {tokens / wall_s:.3g} tokens/s over the wall time; "
        f"mean loss {sum(losses) / max(len(losses), 1):.4f}, last {history[-1]['loss']:.4f}; "
        f"peak memory {max(h['peak_mem_mib'] for h in history):.0f} MiB per rank (rank 0); "
        f"{where}; metrics in {Path(out.dir) / 'metrics.jsonl'}"
    )


def peak_mem_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def progress_fields(method: str) -> tuple[tuple[str, str, str], ...]:
    """(metric, label, format) shown on the progress line: the loss, and what else means something for `method`.

    SFT has no rejected response and no reward: its margin and accuracy are constant zeros, so it
    shows the chosen response's summed log-probability (rising as it learns) instead.
    """
    if method == "sft":
        return (("loss", "loss", ".4f"), ("logps/chosen", "logps/chosen", ".2f"))
    return (("loss", "loss", ".4f"), ("rewards/margins", "margin", ".4f"), ("rewards/accuracies", "acc", ".2f"))


class Progress:
    """Progress of a long loop as `label: i/n unit (rate unit/s, eta Ns)`, printed by rank 0 on stderr.

    Prints at the first update, then at most every `every_s` seconds, and at the last item (with
    the total time instead of the ETA). The rate counts from construction.

        progress = metrics.Progress("build-cache", n_pairs, "pairs")
        for i in range(0, n_pairs, mb):
            ...
            progress.update(min(i + mb, n_pairs))
    """

    def __init__(self, label: str, total: int, unit: str = "", every_s: float = 10.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.t0 = time.perf_counter()
        self.last: float | None = None

    def line(self, done: int, now: float | None = None, note: str = "") -> str:
        """The progress line for `done` of `total` items at time `now` (perf_counter seconds)."""
        seconds = (time.perf_counter() if now is None else now) - self.t0
        unit = f" {self.unit}" if self.unit else ""
        text = f"{self.label}: {done}/{self.total}{unit}"
        if done > 0 and seconds > 0:
            rate = done / seconds
            when = f"took {seconds:.0f}s" if done >= self.total else f"eta {(self.total - done) / rate:.0f}s"
            text += f" ({rate:.3g}{unit}/s, {when})"
        return f"{text} {note}".rstrip()

    def update(self, done: int, note: str = "") -> None:
        """Report `done` items finished (prints when due)."""
        now = time.perf_counter()
        if self.last is not None and done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        if dist.rank() == 0:
            dist.write_line(sys.stderr, self.line(done, now, note))


class Writer:
    """Rank-0 sink for step metrics (jsonl always; TensorBoard / W&B when asked)."""

    def __init__(self, out_dir: str, logging_cfg, total_steps: int, recipe_dict: dict):
        self.cfg, self.total, self.enabled = logging_cfg, total_steps, dist.rank() == 0
        self.method = recipe_dict["loss"]["method"]
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
        if step == 0:  # the held-out baseline before training: its own line (evaluation)
            return
        if step % self.cfg.every == 0 or step == self.total:
            self._progress(step, metrics, first_step)

    def _progress(self, step: int, m: dict[str, float], first_step: int) -> None:
        done = step - first_step
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
        shown = " ".join(f"{label} {m.get(key, math.nan):{fmt}}" for key, label, fmt in progress_fields(self.method))
        line = f"step {step}/{self.total} {shown} lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s eta {eta:.0f}s"
        if self.cfg.progress_bar:
            width = 20
            filled = int(width * step / max(self.total, 1))
            line = f"[{'#' * filled}{'.' * (width - filled)}] " + line
        dist.write_line(sys.stderr, line)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class Clock:
    """Sums the time of marked spans without syncing the device when marking (CUDA events on GPU)."""

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
        else:
            self.host += time.perf_counter() - t0

    def seconds(self) -> float:
        """Total of the marked spans (waits for the device on GPU: read once per step)."""
        if self.spans:
            self.spans[-1][1].synchronize()
        return self.host + sum(a.elapsed_time(b) for a, b in self.spans) / 1000.0
