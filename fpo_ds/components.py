"""Set-up, once for every entry point: recipe -> the components a distributed run needs.

`build(recipe, role, resume)` runs the same steps in the same order for training and for the
cache build, once torch.distributed is up (the entry point starts it): derive the DeepSpeed
config, load the tokenizer and the pairs, load this rank's slice of the SAE encoder (when
features are wanted), build the engine, attach the feature reader, and (training) the
reference. The rule that sae-lens is imported before any `deepspeed.zero.Init` lives here only
(`import_sae_lens`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from fpo_ds import cache, data, dist, ds_config, lora, objective, zero_auto
from fpo_ds import config as C
from fpo_ds import model as M
from fpo_ds.evaluation import EvalSet
from fpo_ds.features import FeatureReader
from fpo_ds.resume import ResumePlan, data_order

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase

Role = Literal["train", "cache"]  # the trainable policy, or the frozen reference whose outputs are cached
Reference = objective.LiveReference | cache.Reader  # where a training run's reference outputs come from


@dataclass(frozen=True)
class Components:
    """What a distributed run works with; `build` fills it, the entry points read it by name."""

    recipe: C.Recipe
    ds_cfg: dict  # the resolved DeepSpeed config
    device: str
    tokenizer: PreTrainedTokenizerBase
    pairs: list[data.Pair]  # the training rows, tokenised
    data_fingerprint: str
    order: data.Order  # which pairs each step trains on (continued from the checkpoint on resume)
    total_steps: int
    features: FeatureReader | None  # pooled SAE features at the SAE's block, of `policy` (train) or `reference_model`
    policy: DeepSpeedEngine | None = None  # train: the trainable policy (optimizer, schedule)
    objective: objective.Objective | None = None  # train: the loss and what it needs
    reference: Reference | None = None  # train: the live reference or the offline cache; None without one
    evaluation: EvalSet | None = None  # train, with held-out pairs (data.eval_split / eval_fraction)
    reference_model: DeepSpeedEngine | None = None  # cache build: the frozen reference whose outputs are cached


def import_sae_lens() -> None:
    """Import sae-lens now: after any `deepspeed.zero.Init` has run in a process, importing it fails.

    Call it before the first engine of a process is built whenever a later step may load an SAE.
    """
    if importlib.util.find_spec("sae_lens"):
        import sae_lens  # noqa: F401


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


def make_optimizer(params, train_cfg, ds_cfg: dict) -> torch.optim.Optimizer:
    """train.optimizer: torch's AdamW or RMSprop; DeepSpeed's CPU Adam (AdamW mode) when the JSON offloads it.

    DeepSpeed refuses a torch optimizer under ZeRO-Offload; its CPU Adam is JIT-compiled on first use.
    """
    t = train_cfg
    if ds_config.offloads_optimizer(ds_cfg):
        if t.optimizer != "adamw":
            raise ValueError(
                f"train.optimizer={t.optimizer}: the DeepSpeed JSON offloads the optimizer, and DeepSpeed's "
                "offloaded optimizers are Adam-family only; use train.optimizer=adamw or a JSON without "
                "offload_optimizer"
            )
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        with dist.announce_build(dist.CPU_ADAM_OP, "DeepSpeed's CPU Adam", dist.CPU_ADAM_BUILD):
            return DeepSpeedCPUAdam(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay, adamw_mode=True)
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=t.lr, alpha=t.rmsprop_alpha, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)


def policy_engine(recipe: C.Recipe, ds_cfg: dict, total_steps: int):
    """The trainable policy: partitioned load, optimizer, LR schedule, deepspeed.initialize (collective)."""
    import deepspeed

    torch.manual_seed(recipe.train.seed)
    policy, keep = M.load_model(recipe.model, ds_cfg)
    if recipe.model.lora.enabled:  # adapters injected in place, base frozen: the engine trains the adapters only
        lora.wrap(policy, recipe.model.lora, seed=recipe.train.seed)
        dist.log(lora.summary(policy, recipe.model.lora))
    if recipe.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    t = recipe.train
    opt = make_optimizer([p for p in policy.parameters() if p.requires_grad], t, ds_cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, total_steps, t.schedule))
    engine, *_ = deepspeed.initialize(model=M.ResponseLM(policy), optimizer=opt, lr_scheduler=sched, config=ds_cfg)
    del keep
    return engine


def _encoder(recipe: C.Recipe, device: str):
    """This rank's slice of the SAE encoder, sharded over its `sae.shard_group` (collective)."""
    from fpo_ds import sae

    group = dist.block_groups(recipe.sae.shard_group)
    encoder, layer = sae.sharded_encoder(recipe.sae, M.load_config(recipe.model), group, device)
    dist.log(
        f"SAE encoder: d_sae {encoder.d_sae}, block {layer}, shard group of {group.size} rank(s) "
        f"(sae.shard_group={recipe.sae.shard_group}), {encoder.resident_bytes() / 2**20:.1f} MiB resident per rank"
    )
    return encoder, layer


def wants_features(recipe: C.Recipe, role: Role) -> bool:
    """Whether this role loads the SAE: training an objective that needs features, or a cache that stores them."""
    return recipe.loss.needs_features if role == "train" else cache.has_features(recipe)


def load_data(recipe: C.Recipe, part: data.Part = "train") -> tuple[object, list[data.Pair], str]:
    """The tokenizer, the tokenised pairs (the training rows, or the held-out ones) and their fingerprint.

    Tokenised once per run (and reused by later runs on the same rows, tokenizer and lengths):
    rank 0 tokenises with one worker per core into the datasets cache while the others wait,
    then every rank loads the result. A node that does not share that directory tokenises on
    its local rank 0. Collective when torch.distributed is up; plain otherwise. Rows per source
    are logged, and kept in data.LAST_SOURCES for the run's run_info.json.
    """
    tok = M.load_tokenizer(recipe.model.name_or_path, recipe.model.revision)
    t0 = time.perf_counter()
    loaded = data.load(recipe.data, tok, part, dist.log, _tokenize_once)
    source = data.rows_source(recipe.data, part)
    formats: dict[str, int] = {}
    for s in loaded.sources:
        for f, n in s["formats"].items():
            formats[f] = formats.get(f, 0) + n
    data.check_formats(formats, recipe.loss.method, source)
    if part == "train":
        data.LAST_SOURCES[:] = loaded.sources
    dist.log(f"data: {len(loaded.pairs)} pairs of {source} ready in {time.perf_counter() - t0:.1f} s")
    return tok, loaded.pairs, loaded.fingerprint


def _tokenize_once(sel: data.Selection, path, key: list, build) -> None:
    """Rank 0 (then, where the directory is not shared, each node's local rank 0) tokenises; all wait.

    The writer checks an existing tokenized set first: a damaged one is named and rebuilt.
    """
    import torch.distributed as tdist

    from fpo_ds import tokenized

    distributed = tdist.is_available() and tdist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    for writer in (dist.rank() == 0, local_rank == 0 and dist.rank() != 0):  # rank 0 checked it already
        error = None
        if writer:

            def timed_build():
                t0, procs = time.perf_counter(), len(os.sched_getaffinity(0))
                dist.log_all(f"data: tokenizing {len(sel.rows)} rows of {sel.label} with {procs} process(es)")
                build(num_proc=procs)
                dist.log_all(f"data: tokenized {len(sel.rows)} rows in {time.perf_counter() - t0:.1f} s -> {path}")

            try:
                tokenized.ensure(path, key, timed_build, dist.log_all)
            except (ValueError, OSError) as e:
                error = f"{type(e).__name__}: {e}"
        if not distributed:
            if error:
                raise ValueError(error)
            return
        errors = [None] * dist.world_size()
        tdist.all_gather_object(errors, error)  # every rank learns of a failure instead of timing out
        failed = [e for e in errors if e]
        if failed:
            raise ValueError(f"data: tokenizing {sel.label} failed: {failed[0]}")


def build(recipe: C.Recipe, role: Role, resume: ResumePlan | None = None) -> Components:
    """Collective: every rank calls it with the same recipe, after torch.distributed is up.

    `resume` (training): the run's ResumePlan; a checkpoint from another world size makes the
    engine load DeepSpeed's universal form, and deepspeed.config=auto keeps the run's choice.
    """
    from deepspeed.accelerator import get_accelerator

    resume = resume or ResumePlan()
    t, world = recipe.train, dist.world_size()
    systems = _auto_systems(recipe, resume) if recipe.deepspeed.config == ds_config.AUTO else None
    ds_cfg = ds_config.build(recipe.deepspeed.config, t.global_batch_size, t.micro_batch_size, world, systems)
    ds_cfg["zero_allow_untested_optimizer"] = True  # torch AdamW (no JIT-compiled DeepSpeed op needed)
    if resume.converted:
        ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
    device = get_accelerator().current_device_name()
    tok, pairs, fingerprint = load_data(recipe)
    order = data.Order(len(pairs), recipe.data.seed, t.global_batch_size)
    if role == "train":  # a refused data change is one rank's message
        check = functools.partial(data_order, resume, fingerprint, len(pairs), recipe)
        order = dist.from_rank0(dist.on_rank0(check))
    steps = order.total_steps(t.epochs, t.max_steps)
    for warning in C.recipe_warnings(recipe):
        dist.log(f"warning: {warning}")
    if t.warmup_steps > steps and t.max_steps is None:
        dist.log(f"warning: train.warmup_steps={t.warmup_steps} exceeds the run's {steps} steps (lr < train.lr)")
    encoder = layer = None
    if wants_features(recipe, role):
        import_sae_lens()
        encoder, layer = _encoder(recipe, device)
    common = dict(recipe=recipe, ds_cfg=ds_cfg, device=device, tokenizer=tok, pairs=pairs, data_fingerprint=fingerprint,
                  order=order)  # fmt: skip
    if role == "cache":
        engine = _reference_engine(recipe, ds_cfg, device)
        features = FeatureReader(engine.module, layer, encoder) if encoder else None
        _announce(recipe, role, None, len(pairs), steps, ds_cfg)
        return Components(**common, total_steps=steps, features=features, reference_model=engine)
    weights = objective.load_feature_weights(recipe.sae.feature_weights, encoder.d_sae, device) if encoder else None
    obj = objective.build(recipe.loss, recipe.sae.k, weights)
    policy = policy_engine(recipe, ds_cfg, steps)
    reference = None
    if obj.ref_kind == "live" and recipe.model.lora.enabled:  # the base model, adapters off: no second copy
        reference = objective.LiveReference(policy, obj.needs_kl, adapters_off=True)
        dist.log(_no_reference_copy(policy, ds_cfg))
    elif obj.ref_kind == "live":
        reference = objective.LiveReference(_reference_engine(recipe, ds_cfg, device), obj.needs_kl)
    elif obj.ref_kind == "offline":
        reference = cache.Reader(recipe, tok, fingerprint, device, features=obj.needs_features)
    evaluation = _eval_set(recipe, obj, reference, device) if data.has_eval(recipe.data) else None
    features = FeatureReader(policy.module, layer, encoder) if encoder else None
    _announce(recipe, role, obj, len(pairs), steps, ds_cfg)
    return Components(**common, total_steps=steps, features=features, policy=policy, objective=obj,
                      reference=reference, evaluation=evaluation)  # fmt: skip


def _announce(recipe: C.Recipe, role: Role, obj: objective.Objective | None, n_pairs: int, steps: int, ds_cfg: dict):
    t, world = recipe.train, dist.world_size()
    dist.log(
        f"fpo-ds {role}: {recipe.loss.method if obj else 'reference cache'}"
        f"{f' (reference: {obj.ref_kind})' if obj else ''}, {n_pairs} pairs, {steps} steps, world {world}, "
        f"global batch {t.global_batch_size} = micro {t.micro_batch_size} x {world} ranks x accumulation "
        f"{ds_cfg['gradient_accumulation_steps']}, ZeRO-{ds_config.zero_stage(ds_cfg)}, {ds_config.torch_dtype(ds_cfg)}"
    )


def _auto_systems(recipe: C.Recipe, resume: ResumePlan) -> dict:
    """deepspeed.config=auto: the resumed run's choice (its checkpoint's layout), else a fresh one."""
    saved = resume.deepspeed_config if resume.tag is not None else None
    if saved:
        drop = (*ds_config.BATCH_KEYS, "steps_per_print", "zero_allow_untested_optimizer", "checkpoint")
        dist.log(f"deepspeed.config=auto: resuming under the run's choice (stage {ds_config.zero_stage(saved)})")
        return {k: v for k, v in saved.items() if k not in drop}
    choice = zero_auto.resolve(recipe, dist.world_size(), dist.local_world_size())
    dist.log(choice.reason)
    return choice.systems


def _reference_engine(recipe: C.Recipe, ds_cfg: dict, device: str):
    """The frozen reference (collective): replicated when small beside a rank's memory, else sharded."""
    whole, why = zero_auto.reference_whole(recipe.model, ds_cfg, device.split(":")[0], dist.local_world_size())
    if why:
        dist.log(why)
    return M.frozen_engine(recipe.model, ds_cfg, whole)


def _no_reference_copy(engine, ds_cfg: dict) -> str:
    """The log line of a LoRA run's live reference: the policy's base, so no second model and its memory saved."""
    frozen = sum(lora.numel(p) for p in engine.module.parameters() if not p.requires_grad)
    whole = frozen * ds_config.torch_dtype(ds_cfg).itemsize
    per_rank = whole / (dist.world_size() if ds_config.zero_stage(ds_cfg) == 3 else 1)
    return (
        f"reference: no reference model loaded (LoRA: the reference is this model with its adapters off); "
        f"saved {whole / 2**20:.2f} MiB of reference weights ({per_rank / 2**20:.2f} MiB per rank)"
    )


def _eval_set(recipe: C.Recipe, obj: objective.Objective, reference, device: str) -> EvalSet:
    """The held-out pairs and their reference: the live one, or the offline cache's held-out part."""
    tok, pairs, fingerprint = load_data(recipe, "eval")
    if obj.ref_kind == "offline":
        reference = cache.Reader(recipe, tok, fingerprint, device, part="eval", features=obj.needs_features)
    source = data.rows_source(recipe.data, "eval")
    dist.log(f"held-out metrics: {len(pairs)} pairs of {source}, every {recipe.train.eval_every or 'end of'} step(s)")
    return EvalSet(pairs, reference, source)
