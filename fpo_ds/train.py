"""`fpo-ds train RECIPE [key=value ...]`: load config -> set up -> loop -> save.

Run under any launcher that sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, e.g.
    torchrun --nproc_per_node 2 -m fpo_ds.train recipes/tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from deepspeed.accelerator import get_accelerator

from fpo_ds import checkpoint, data, dist, metrics, objective
from fpo_ds import config as C
from fpo_ds import model as M

warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*|.*reduce_scatter_tensor.*")


class Setup(NamedTuple):
    recipe: C.Recipe
    engine: object
    reference: object | None  # live reference engine, or the offline cache reader
    objective: objective.Objective
    pairs: list
    tokenizer: object
    model_config: object
    total_steps: int
    device: str
    tap: M.ResidualTap | None = None  # FPO: block L's output
    encoder: object | None = None  # FPO: this rank's ShardedEncoder slice


def lr_lambda(warmup: int, total: int, schedule: str):
    """Linear warmup to the peak, then constant or cosine decay to 0 at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def adamw(params, train_cfg, ds_cfg: dict) -> torch.optim.Optimizer:
    """AdamW: torch's, or DeepSpeed's CPU Adam (AdamW mode) when the JSON offloads the optimizer.

    DeepSpeed refuses a torch optimizer under ZeRO-Offload; its CPU Adam is JIT-compiled on first use.
    """
    t = train_cfg
    offload = ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)


def total_steps(n_pairs: int, train_cfg) -> int:
    per_epoch = n_pairs // train_cfg.global_batch_size
    if per_epoch == 0:
        raise ValueError(
            f"data: {n_pairs} usable pairs is less than one global batch (train.global_batch_size="
            f"{train_cfg.global_batch_size}); add data or lower the batch size"
        )
    total = per_epoch * train_cfg.epochs
    return min(total, train_cfg.max_steps) if train_cfg.max_steps else total


def setup(recipe: C.Recipe) -> Setup:
    import deepspeed

    dist.init(recipe.deepspeed.timeout_minutes)
    world = dist.world_size()
    ds_cfg = M.deepspeed_config(
        recipe.deepspeed.config, recipe.train.global_batch_size, recipe.train.micro_batch_size, world
    )
    ds_cfg["zero_allow_untested_optimizer"] = True  # torch AdamW (no JIT-compiled DeepSpeed op needed)
    device = get_accelerator().current_device_name()
    tok = M.load_tokenizer(recipe.model.name_or_path, recipe.model.revision)
    pairs, data_fp = data.load_pairs(recipe.data, tok, log=dist.log)
    steps = total_steps(len(pairs), recipe.train)
    encoder = layer = weights = None
    if recipe.loss.method == "fpo":  # sae-lens must be imported before zero.Init
        from fpo_ds import sae

        encoder, layer = sae.sharded_encoder(recipe.sae, M.load_config(recipe.model), dist.rank(), world, device)
        weights = sae.load_feature_weights(recipe.sae.feature_weights, encoder.d_sae, device)
    obj = objective.build(recipe.loss, recipe.sae.k, weights)
    torch.manual_seed(recipe.train.seed)
    policy, keep = M.load_model(recipe.model, ds_cfg)
    if recipe.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    t = recipe.train
    opt = adamw(policy.parameters(), t, ds_cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, steps, t.schedule))
    engine, *_ = deepspeed.initialize(model=policy, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
    del keep
    reference = None
    if obj.reference == "live":
        reference = M.frozen_engine(recipe.model, ds_cfg)
    elif obj.reference == "offline":
        from fpo_ds import cache

        reference = cache.Reader(recipe, tok, data_fp, device)
    dist.log(
        f"fpo-ds train: {recipe.loss.method} (reference: {obj.reference}), {len(pairs)} pairs, {steps} steps, "
        f"world {world}, global batch {t.global_batch_size} = micro {t.micro_batch_size} x {world} ranks x "
        f"accumulation {ds_cfg['gradient_accumulation_steps']}, ZeRO-{M.zero_stage(ds_cfg)}, {M.torch_dtype(ds_cfg)}"
    )
    tap = M.ResidualTap(engine.module, layer) if encoder else None
    return Setup(recipe, engine, reference, obj, pairs, tok, engine.module.config, steps, device, tap, encoder)


def reference_out(s: Setup, batch: data.Batch) -> objective.RefOut | None:
    if s.objective.reference == "none":
        return None
    if s.objective.reference == "offline":
        t0 = time.perf_counter()
        ref = s.reference.ref_out(batch.example_ids)
        s.reference.read_seconds += time.perf_counter() - t0  # host-side work only: no device sync
        return ref
    with torch.no_grad():
        out = M.sequence_logps(s.reference, batch, keep_logits=s.objective.keep_logits)
    return objective.RefOut(out.sum_logps, out.sum_logps / out.n_tokens, out.logits)


def _fault_steps(var: str) -> set[int]:
    """Test hooks (fault injection) on rank 1 at the listed steps, e.g. FPO_DS_FAULT_NAN_STEPS=3,4.

    FPO_DS_FAULT_NAN_STEPS makes its loss NaN; FPO_DS_FAULT_NAN_GRAD_STEPS its gradients (loss finite).
    """
    raw = os.environ.get(var, "")
    return {int(x) for x in raw.split(",") if x.strip()} if dist.rank() == min(1, dist.world_size() - 1) else set()


def _any_rank(flag: bool | torch.Tensor, device: str) -> bool:
    """Collective: True on every rank when `flag` is true on any rank."""
    t = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def micro_step(
    s: Setup, batch: data.Batch, poison: str | None = None, n_max: int | None = None
) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """Forward (chosen and rejected concatenated), loss, backward. Returns (metric sums, skip reason).

    Ranks decide together. A non-finite loss on any rank: every rank drops this micro-batch's
    gradients and the step runs at lr 0 (weights unchanged); reason "loss", sums None. A non-finite
    gradient norm at the step's last micro-batch: DeepSpeed skips the optimizer step; reason "gradient".
    """
    batch = M.to_device(batch, s.device)
    ref = reference_out(s, batch)
    pol = M.sequence_logps(s.engine, batch, s.objective.keep_logits, s.tap, s.encoder, n_max)
    out = s.objective.fn(pol, ref)
    if poison == "loss":
        out = out._replace(losses=out.losses * float("nan"))
    elif poison == "gradient":
        out.losses.register_hook(lambda g: g * float("nan"))
    if _any_rank(~torch.isfinite(out.losses.detach()).all(), s.device):
        del out, pol, ref  # drop the poisoned graph: its gradients would be NaN
        for group in s.engine.optimizer.param_groups:
            group["lr"] = 0.0  # the scheduler sets it again after this optimizer step
        # DeepSpeed's optimizer step needs a backward; a 2-token forward times 0 gives finite zero grads.
        zero = s.engine(input_ids=batch.input_ids[:1, :2]).logits.float().sum() * 0.0
        s.engine.backward(zero)
        s.engine.step()
        return None, "loss"
    s.engine.backward(out.losses.mean())
    boundary = s.engine.is_gradient_accumulation_boundary()  # this micro-batch ends the step
    s.engine.step()
    # DeepSpeed's ZeRO optimizers (deepspeed pinned in pyproject) skip a step whose gradient norm is
    # not finite, zeroing the gradients; under fp16 that is routine loss scaling, not a fault.
    bad_grad = boundary and getattr(s.engine.optimizer, "overflow", False) and not s.engine.fp16_enabled()
    sums = metrics.pair_metrics(out, pol.sum_logps)
    sums["tokens"] = batch.attention_mask.sum().double()
    return sums, "gradient" if bad_grad else None


def train_step(s: Setup, step: int) -> tuple[dict[str, float], list[int], str | None]:
    """One optimizer step (this rank's share of the global batch).

    Returns metrics, the pair ids whose step was skipped and why ("loss" / "gradient"; see micro_step).
    """
    t0, lr = time.time(), s.engine.get_lr()[0]
    r, t = s.recipe, s.recipe.train
    world = dist.world_size()
    every = [data.step_indices(len(s.pairs), r.data.seed, step, t.global_batch_size, k, world) for k in range(world)]
    idx = every[dist.rank()]
    sums, skipped, reason = [], [], None
    poison = "loss" if step + 1 in _fault_steps("FPO_DS_FAULT_NAN_STEPS") else None
    poison = "gradient" if step + 1 in _fault_steps("FPO_DS_FAULT_NAN_GRAD_STEPS") else poison
    for i in range(0, len(idx), t.micro_batch_size):
        chunk = [s.pairs[j] for j in idx[i : i + t.micro_batch_size]]
        # The sharded encoder gathers every rank's response tokens padded to the largest count;
        # each rank knows all ranks' pairs, so that count needs no collective.
        n_max = max(data.response_tokens([s.pairs[j] for j in ix[i : i + t.micro_batch_size]]) for ix in every)
        got, why = micro_step(s, data.collate(chunk, s.tokenizer.pad_token_id), poison, n_max)
        reason = reason or why
        if got is None:
            skipped += [p.example_id for p in chunk]
        else:
            sums.append(got)
    if reason == "gradient":  # the whole step's accumulated gradient was dropped
        skipped = [s.pairs[j].example_id for j in idx]
    m = metrics.reduce(sums, s.device) if sums else {"loss": float("nan"), "tokens": 0.0}
    dt = time.time() - t0
    if s.encoder is not None:  # forward and backward each move the same volume
        m["fpo/sae_comm_bytes_per_step"] = 2.0 * s.encoder.bytes_per_call * len(sums)
        m["time/sae_encode_s"] = s.encoder.clock.take()
    if s.objective.reference == "offline":
        m["time/cache_read_s"], s.reference.read_seconds = s.reference.read_seconds, 0.0
    tokens = m.pop("tokens")
    m.update(
        lr=0.0 if skipped else lr,
        grad_norm=float("nan") if reason == "gradient" else float(s.engine.get_global_grad_norm() or 0.0),
        tokens_per_s=tokens / dt,
        samples_per_s=t.global_batch_size / dt,
        step_time_s=dt,
        peak_mem_mib=metrics.peak_mem_mib(),
    )
    if not skipped and not math.isfinite(m["grad_norm"]):
        raise FloatingPointError(
            f"step {step + 1}: gradient norm is {m['grad_norm']} with a finite loss; the weights are no longer "
            "finite, so training stops before any checkpoint is written. Resume from the last checkpoint "
            "(output.resume=auto) with a lower train.lr or fp32"
        )
    return m, skipped, reason


DONE = "DONE.json"  # written last by a run that reached its final step


def versions() -> dict:
    """What produced a run: library versions and the git commit of this checkout (if any)."""
    import subprocess

    import deepspeed
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    from importlib.metadata import PackageNotFoundError, version

    try:
        sae_lens = version("sae-lens")  # read from metadata: importing sae_lens costs seconds
    except PackageNotFoundError:
        sae_lens = None
    return {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "sae_lens": sae_lens,
        "git_commit": commit or None,
    }


class Preemption:
    """Stop cleanly on SIGUSR1 (Slurm's --signal, before the time limit) or SIGTERM (preemption).

    The current step finishes, every rank checkpoints, and the process exits with EXIT_REQUEUE.
    """

    EXIT_REQUEUE = 75  # EX_TEMPFAIL: slurm/train.sh requeues the job on this code

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._catch)

    def _catch(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def agreed(self, device: str) -> bool:
        """Collective: ranks may get the signal at different steps; stop when any rank got it."""
        return _any_rank(self.signal is not None, device)


def _gather_lists(items: list) -> list[list]:
    out = [None] * dist.world_size()
    torch.distributed.all_gather_object(out, items)
    return out


class Result(NamedTuple):
    history: list[dict]  # this run's step metrics (identical on every rank)
    setup: Setup
    preempted: bool


def run(recipe: C.Recipe) -> Result:
    """Train per the recipe, resuming per output.resume; stops early (with a checkpoint) on preemption."""
    stop = Preemption()
    s = setup(recipe)
    if dist.rank() == 0:
        Path(recipe.output.dir).mkdir(parents=True, exist_ok=True)
        C.dump(recipe, Path(recipe.output.dir) / "recipe.yaml")
    start = 0
    resume_dir = checkpoint.find_resume(recipe.output)
    if resume_dir is not None:
        client = checkpoint.load(s.engine, resume_dir)
        start = client["step"]
        dist.log(f"resumed from {resume_dir} at step {start} ({client['consumed_samples']} samples consumed)")
    if dist.rank() == 0:
        metrics.truncate(Path(recipe.output.dir) / "metrics.jsonl", start)  # a resume replays steps > start
        info = {
            "recipe": C.to_dict(recipe),
            "world_size": dist.world_size(),
            "resumed_from": str(resume_dir or ""),
            "start_step": start,
            "total_steps": s.total_steps,
            **versions(),
        }
        if s.objective.reference == "offline":
            info["cache_fingerprints"] = s.reference.manifest["fingerprints"]
        (Path(recipe.output.dir) / "run_info.json").write_text(json.dumps(info, indent=1))
    writer = metrics.Writer(recipe.output.dir, recipe.logging, s.total_steps, C.to_dict(recipe))
    history, preempted, bad_run, bad_total = [], False, 0, 0
    for step in range(start, s.total_steps):
        m, skipped, reason = train_step(s, step)
        bad_run = bad_run + 1 if skipped else 0
        bad_total += bool(skipped)
        m["nonfinite_skipped_steps"] = bad_total
        if skipped:
            ids = sorted(set(sum(_gather_lists(skipped), [])))
            dist.log(f"step {step + 1}: non-finite {reason}; step skipped (weights unchanged). Pair ids: {ids[:20]}")
            if bad_run >= recipe.train.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{bad_run} steps in a row with a non-finite loss or gradient (last: step {step + 1}, "
                    f"pair ids {ids[:20]}); "
                    "stopping (train.max_nonfinite_steps). Check those rows, lower train.lr, or use fp32"
                )
        history.append({"step": step + 1, **m})
        writer.write(step + 1, m, start)
        every, done = recipe.output.save_every, step + 1
        preempted = stop.agreed(s.device)
        if (every and done % every == 0) or done == s.total_steps or preempted:
            client = {"step": done, "consumed_samples": done * recipe.train.global_batch_size}
            checkpoint.save(s.engine, recipe, done, client, s.model_config, s.tokenizer)
        if preempted:
            dist.log(f"preempted ({stop.signal or 'signal on another rank'}) after step {done}: checkpoint saved")
            break
    writer.close()
    if not preempted and dist.rank() == 0:
        (Path(recipe.output.dir) / DONE).write_text(json.dumps({"steps": s.total_steps, **versions()}))
    return Result(history, s, preempted)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fpo-ds train", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=1e-6")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    recipe = C.load(args.recipe, args.overrides)
    result = run(recipe)
    dist.shutdown(Preemption.EXIT_REQUEUE if result.preempted else 0)


if __name__ == "__main__":
    main()
