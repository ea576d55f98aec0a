"""`fpo-ds train RECIPE [key=value ...]`: load config -> set up -> loop -> save.

Run under any launcher that sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, e.g.
    torchrun --nproc_per_node 2 -m fpo_ds.train recipes/tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from fpo_ds import checkpoint, data, dist, evaluation, faults, features, metrics, resume, rundir
from fpo_ds import config as C
from fpo_ds import model as M
from fpo_ds.components import Components, build
from fpo_ds.encoder import Encoded

warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*|.*reduce_scatter_tensor.*")


SkipReason = Literal["loss", "gradient"]  # a non-finite loss, or a non-finite gradient norm


class MicroResult(NamedTuple):
    """One micro-batch: metric sums (device tensors), whether its losses were finite, and its costs."""

    sums: dict[str, torch.Tensor]
    finite: torch.Tensor  # () bool, on the device: every loss of this micro-batch is finite (read at the step's end)
    sae: Encoded | None  # FPO: the feature read (bytes moved, encode time)
    cache_read_s: float  # host time spent reading the offline cache


class Verdict(NamedTuple):
    """What the ranks agreed at the step's last micro-batch (the step's one host synchronisation)."""

    bad_loss: bool  # some rank saw a non-finite loss in this step: the whole step is skipped
    stop: bool  # some rank has been asked to stop (preemption)


class StepResult(NamedTuple):
    metrics: dict[str, float]
    skipped_ids: list[int]  # this rank's pair ids of a skipped step (empty otherwise)
    skip: SkipReason | None
    stop: bool  # every rank agrees to stop after this step (a rank got SIGUSR1/SIGTERM)


def _any_rank(device: str, *flags: bool | torch.Tensor) -> list[bool]:
    """Collective: for each flag, True on every rank when it is true on any rank (one all-reduce, one sync)."""
    t = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=device).reshape(()) for f in flags])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def micro_step(
    c: Components, batch: data.Batch, poison: faults.Poison | None, peers: list | None
) -> tuple[MicroResult, torch.Tensor]:
    """Forward (chosen and rejected concatenated) and loss; returns the result and the loss to back-propagate.

    Nothing here waits for the device: whether the losses were finite stays a device tensor,
    read once per optimizer step (train_step).
    """
    batch = M.to_device(batch, c.device)
    t0 = time.perf_counter()
    ref = c.reference(batch) if c.reference is not None else None
    read_s = time.perf_counter() - t0 if c.objective.ref_kind == "offline" else 0.0  # host work only: no sync
    fwd = features.forward(c.policy, batch, c.features, peers, ref.head if c.objective.needs_kl else None)
    out = c.objective.fn(fwd.out, ref, fwd.features)
    if poison == "loss":
        out = out._replace(losses=out.losses * float("nan"))
    elif poison == "gradient":
        out.losses.register_hook(lambda g: g * float("nan"))
    sums = metrics.pair_metrics(out, fwd.out)
    sums["tokens"] = batch.attention_mask.sum().double()
    finite = torch.isfinite(out.losses.detach()).all()
    return MicroResult(sums, finite, fwd.sae, read_s), out.losses.mean()


def _plain_grad_norm(engine) -> float | None:
    """The gradient norm (after DeepSpeed's all-reduce) where DeepSpeed reports none: fp32 without ZeRO.

    Its stage-0 fp32 path clips but keeps no norm and steps on a non-finite gradient; ZeRO and the
    16-bit optimizers keep both (get_global_grad_norm, overflow). None where DeepSpeed has it.
    """
    if engine.zero_optimization_stage() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _backward_and_step(c: Components, loss: torch.Tensor, verdict: Verdict | None) -> tuple[bool, float | None]:
    """Backward and DeepSpeed's step; at the step's boundary returns (gradient not finite, own grad norm).

    A step with a non-finite loss on any rank is skipped whole: its last backward is made
    non-finite on every rank, so the step's gradient is, and the optimizer skips the update as it
    does for any non-finite gradient (DeepSpeed's ZeRO and 16-bit optimizers: no weight change,
    Adam's moments and step count untouched; fp32 without ZeRO: the gradients are dropped here,
    and torch's Adam skips parameters without one). Under fp16 that is also a loss-scale overflow.
    """
    if verdict is not None and verdict.bad_loss:
        loss = loss * float("nan")
    c.policy.backward(loss)
    boundary = c.policy.is_gradient_accumulation_boundary()  # this micro-batch ends the step
    own_norm = _plain_grad_norm(c.policy) if boundary else None
    if own_norm is not None and not math.isfinite(own_norm):
        c.policy.module.zero_grad(set_to_none=True)  # as DeepSpeed's ZeRO optimizers do: no update this step
    c.policy.step()
    # DeepSpeed's optimizers (deepspeed pinned in pyproject) skip a step whose gradient norm is not
    # finite, zeroing the gradients; under fp16 that is routine loss scaling, not a fault.
    bad_grad = boundary and getattr(c.policy.optimizer, "overflow", False) and not c.policy.fp16_enabled()
    bad_grad = bad_grad or (own_norm is not None and not math.isfinite(own_norm))
    return bool(bad_grad), own_norm


def train_step(c: Components, step: int, lengths: list[int], stop: Preemption | None = None) -> StepResult:
    """One optimizer step (this rank's share of the global batch, in micro-batches grouped by `lengths`).

    Which pairs: `c.order` (continued from the checkpoint on resume).

    Skip semantics: a non-finite loss on any rank, or a non-finite gradient, skips the whole step
    (optimizer state untouched) and every pair id of the step is reported. The ranks agree on it,
    and on a stop request, in one all-reduce at the step's last micro-batch, before its backward:
    the only host synchronisation the loop adds.
    """
    t0, lr = time.time(), c.policy.get_lr()[0]
    t, rank, world = c.recipe.train, dist.rank(), dist.world_size()
    plan = c.order.micro_batches(step, t.micro_batch_size, world, lengths)
    poison = faults.poison(step + 1)
    ids = [c.pairs[j].example_id for positions in plan for j in positions[rank]]  # this rank's pairs of the step
    faults.trace_pairs(step + 1, ids)
    results: list[MicroResult] = []
    verdict = Verdict(False, False)
    bad_grad, own_norm = False, None
    for i, positions in enumerate(plan):
        chunk = [c.pairs[j] for j in positions[rank]]
        # The feature reader sizes its group's token gather from every rank's pairs (no collective).
        peers = [[c.pairs[j] for j in ix] for ix in positions] if c.features else None
        res, loss = micro_step(c, data.collate(chunk, c.tokenizer.pad_token_id), poison, peers)
        results.append(res)
        last = None
        if i == len(plan) - 1:
            finite = torch.stack([r.finite for r in results]).all()
            asked = stop is not None and stop.signal is not None
            last = verdict = Verdict(*_any_rank(c.device, ~finite, asked))
        bad_grad, own_norm = _backward_and_step(c, loss, last)
    skip = "loss" if verdict.bad_loss else "gradient" if bad_grad else None
    skipped = ids if skip else []
    grad_norm = own_norm if own_norm is not None else float(c.policy.get_global_grad_norm() or 0.0)
    grad_norm = float("nan") if skip else grad_norm
    m = metrics.step_metrics(
        [x.sums for x in results] if skip != "loss" else [],
        c.device,
        lr=0.0 if skip else lr,
        grad_norm=grad_norm,
        seconds=time.time() - t0,
        global_batch=t.global_batch_size,
        sae=[x.sae for x in results] if c.features else None,
        cache_read_s=sum(x.cache_read_s for x in results) if c.objective.ref_kind == "offline" else None,
    )
    if not skip and not math.isfinite(m["grad_norm"]):
        raise FloatingPointError(
            f"step {step + 1}: gradient norm is {m['grad_norm']} with a finite loss; the weights are no longer "
            "finite, so training stops before any checkpoint is written. Resume from the last checkpoint "
            "(output.resume=auto) with a lower train.lr or fp32"
        )
    return StepResult(m, skipped, skip, verdict.stop)


DONE = "DONE.json"  # written last by a run that reached its final step


class Preemption:
    """Stop cleanly on SIGUSR1 (Slurm's --signal, before the time limit), SIGTERM (preemption) or SIGINT (Ctrl-C).

    Installed once the ranks have met (before that the signals keep their default effect, so a
    rendezvous wait ends at once). During set-up there is nothing to save: the rank exits at once.
    During training the current step finishes, every rank checkpoints, and the process exits with
    EXIT_REQUEUE (75), or EXIT_INTERRUPTED (130) after Ctrl-C. A second Ctrl-C, a second or more
    after the first (torchrun forwards the terminal's one to its ranks within milliseconds), exits
    at once, without a checkpoint.
    """

    EXIT_REQUEUE = 75  # EX_TEMPFAIL: slurm/train.sh requeues the job on this code
    EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C: stopped by the user, checkpoint saved

    def __init__(self):
        self.signal = None
        self.training = False  # set when the first step starts; before it a signal exits at once
        self._first = 0.0
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._catch)

    @property
    def exit_code(self) -> int:
        return self.EXIT_INTERRUPTED if self.signal == "SIGINT" else self.EXIT_REQUEUE

    def _catch(self, signum, frame) -> None:
        name, now = signal.Signals(signum).name, time.monotonic()
        if self.signal is None:
            self.signal, self._first = name, now
            if not self.training:
                dist.stop_now(self.exit_code, f"{name} during set-up: nothing to save yet; exiting ({self.exit_code})")
        elif name == "SIGINT" and now - self._first > 1.0:
            dist.stop_now(self.EXIT_INTERRUPTED, "second Ctrl-C: exiting at once, without a checkpoint")


def _gather_lists(items: list) -> list[list]:
    out = [None] * dist.world_size()
    torch.distributed.all_gather_object(out, items)
    return out


class Result(NamedTuple):
    history: list[dict]  # this run's step metrics (identical on every rank)
    components: Components
    preempted: bool
    exit_code: int = 0  # Preemption.EXIT_REQUEUE / EXIT_INTERRUPTED when stopped early by a signal


def run(recipe: C.Recipe) -> Result:
    """Train per the recipe, resuming per output.resume; stops early (with a checkpoint) on preemption."""
    dist.init(recipe.deepspeed.timeout_minutes)
    stop = Preemption()  # after the rendezvous: a signal during that wait ends the process at once
    with rundir.exclusive(lambda: _claim(recipe)):
        return _run(recipe, resume.plan(recipe), stop)


def _claim(recipe: C.Recipe):
    """Rank 0, before anything is loaded: the run lock and a ready output.dir."""
    lock = rundir.claim(recipe.output.dir, "output.dir")
    rundir.prepare(recipe.output)
    return lock


def _load(c: Components, recipe: C.Recipe, plan: resume.ResumePlan) -> tuple[int, float]:
    """Collective: load the plan's checkpoint, apply the recipe's lr; (steps done, input tokens consumed so far)."""
    if plan.tag is None:
        return 0, 0.0
    client = checkpoint.load(c.policy, plan)
    # The restored schedule carries the old run's base lr; the recipe's is the one to follow from here.
    sched = c.policy.lr_scheduler
    sched.base_lrs = [recipe.train.lr for _ in sched.base_lrs]
    for group, base, f in zip(c.policy.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * f(sched.last_epoch)
    dist.log(f"resumed from {plan.tag} at step {client['step']} ({client['consumed_samples']} samples consumed)")
    # Checkpoints written before the token count was saved: it restarts from the samples' share.
    return client["step"], float(client.get("num_tokens", 0.0))


def _run(recipe: C.Recipe, plan: resume.ResumePlan, stop: Preemption) -> Result:
    t_start = time.time()
    for line in plan.describe():
        dist.log(line)
    c = build(recipe, "train", plan)
    start, num_tokens = _load(c, recipe, plan)
    if dist.rank() == 0:
        C.dump(recipe, Path(recipe.output.dir) / "recipe.yaml")
        rundir.repair_metrics(Path(recipe.output.dir) / "metrics.jsonl", start)  # a resume replays steps > start
        info = {
            "recipe": C.to_dict(recipe),
            "world_size": dist.world_size(),
            "resumed_from": str(plan.tag or ""),
            "start_step": start,
            "resume_changes": {k: list(v) for k, v in plan.changes.items()},
            "total_steps": c.total_steps,
            "deepspeed_config": c.ds_cfg,  # as resolved (deepspeed.config=auto records its choice)
            "data_sources": data.LAST_SOURCES,  # rows read, selected and kept per source (a mixture's too)
            **rundir.versions(),
        }
        if c.objective.ref_kind == "offline":
            info["cache_fingerprints"] = c.reference.manifest["fingerprints"]
        (Path(recipe.output.dir) / "run_info.json").write_text(json.dumps(info, indent=1))
    writer = metrics.Writer(recipe.output.dir, recipe.logging, c.total_steps, C.to_dict(recipe))
    history, preempted, bad_run, bad_total, saved = [], False, 0, 0, None
    lengths = [data.padded_length(p) for p in c.pairs]
    if c.evaluation is not None and recipe.train.eval_every and start == 0:  # the starting policy's baseline
        base = evaluation.held_out_metrics(c)
        dist.log(metrics.eval_line(0, base))
        writer.write(0, base, start)
    stop.training = True
    for step in range(start, c.total_steps):
        m, skipped, reason, preempted = train_step(c, step, lengths, stop)
        bad_run = bad_run + 1 if skipped else 0
        bad_total += bool(skipped)
        num_tokens += m["step_tokens"]
        epoch = c.order.epochs_done(step + 1)  # epochs of this data set
        m.update(nonfinite_skipped_steps=bad_total, num_tokens=num_tokens, epoch=epoch)
        if skipped:
            ids = sorted(set(sum(_gather_lists(skipped), [])))  # every pair of the step, from every rank
            dist.log(
                f"step {step + 1}: non-finite {reason}; step skipped (weights and optimizer state unchanged). "
                f"Pair ids: {ids}"
            )
            if bad_run >= recipe.train.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{bad_run} steps in a row with a non-finite loss or gradient (last: step {step + 1}, "
                    f"pair ids {ids[:20]}); "
                    "stopping (train.max_nonfinite_steps). Check those rows, lower train.lr, or use fp32"
                )
        done = step + 1
        if _eval_due(recipe.train, done, c.total_steps, c.evaluation):
            m.update(evaluation.held_out_metrics(c))
            dist.log(metrics.eval_line(done, m))
        history.append({"step": done, **m})
        writer.write(done, m, start)
        if _save_due(recipe.output, done, c.total_steps) or preempted:
            order = c.order.state(done)
            client = {"step": done, "consumed_samples": order["samples_before"], "num_tokens": num_tokens}
            client |= {"data_fingerprint": c.data_fingerprint, "data_order": order}
            saved = checkpoint.save(c.policy, recipe, done, client, c.policy.module.config, c.tokenizer)
        if preempted:
            how = "interrupted" if stop.signal == "SIGINT" else "preempted"
            dist.log(
                f"{how} ({stop.signal or 'signal on another rank'}) after step {done}: checkpoint saved; "
                f"exit code {stop.exit_code}"
            )
            break
    writer.close()
    summary = metrics.run_summary(history, time.time() - t_start, saved, recipe.output)
    dist.log(summary)
    if not preempted and dist.rank() == 0:
        done_info = {"steps": c.total_steps, "summary": summary, **rundir.versions()}
        (Path(recipe.output.dir) / DONE).write_text(json.dumps(done_info))
    return Result(history, c, preempted, stop.exit_code if preempted else 0)


def _eval_due(t: C.TrainConfig, done: int, total: int, held_out) -> bool:
    """Held-out metrics every train.eval_every steps and after the last step, when there are held-out pairs."""
    return held_out is not None and ((t.eval_every and done % t.eval_every == 0) or done == total)


def _save_due(out: C.OutputConfig, done: int, total: int) -> bool:
    """A checkpoint at every output.save_every steps, and at the end unless output.save_final is off."""
    return bool(out.save_every and done % out.save_every == 0) or (done == total and out.save_final)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fpo-ds train", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=1e-6")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    dist.report_failures()
    recipe = C.load(args.recipe, args.overrides)
    result = run(recipe)
    dist.shutdown(result.exit_code)


if __name__ == "__main__":
    main()
