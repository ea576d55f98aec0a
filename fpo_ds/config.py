"""Recipe configuration: one YAML file -> one frozen, validated dataclass tree.

Every key is a typed field. Unknown keys, wrong types, bad choices and missing required
keys are collected and reported together with their dotted paths, so a user fixes a recipe
in one pass. Building a config touches no network, GPU or model file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# The one table of methods (LossConfig.method is its keys; objective.py has one loss per key).
# What each needs besides the policy's log-probs: its reference ("recipe": loss.reference says),
# TDPO's full-vocabulary KL head, SAE features. Every module asks LossConfig (or the run's
# Objective), never the method name.
METHOD_NEEDS = {
    "sft": ("none", False, False),
    "dpo": ("recipe", False, False),
    "ipo": ("recipe", False, False),
    "simpo": ("none", False, False),
    "tdpo1": ("live", True, False),
    "tdpo2": ("live", True, False),
    "fpo": ("offline", False, True),
}
# Paper defaults (arXiv 2411.07618): beta 0.1 everywhere except SimPO's 2.0.
DEFAULT_BETA = {"sft": 0.0, "dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "tdpo1": 0.1, "tdpo2": 0.1, "fpo": 0.1}
MISSING_REQUIRED = object()


class ConfigError(ValueError):
    """A recipe problem (or several), each naming its dotted key and the fix."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (through PEFT) instead of full-parameter training; r=0 (the default) is off.

    The base weights are frozen and the adapters train. Live-reference methods (DPO, IPO, TDPO) get
    their reference from the same model with the adapters switched off, so no second model is loaded.
    """

    r: int = 0
    """Adapter rank; 0: LoRA off (every weight trains)."""
    alpha: float = 16.0
    """Scaling numerator: each adapter's update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input (0 keeps the forward deterministic)."""
    target_modules: str | list[str] = "all-linear"
    """all-linear (every Linear of the decoder, not the LM head) or module names such as [q_proj, v_proj]."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters (PEFT's modules_to_save), e.g. [embed_tokens]."""
    quantize: bool | str | None = None
    """4-bit base weights (QLoRA): not supported (needs bitsandbytes on a GPU); leave null."""

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass(frozen=True)
class ModelConfig:
    """The policy (and, at step 0, the reference) model."""

    name_or_path: str = dataclasses.field(default=MISSING_REQUIRED)  # type: ignore[assignment]
    """Hugging Face hub id or a local directory written by `save_pretrained`."""
    revision: str | None = None
    """Hub revision (commit, tag or branch); part of the cache fingerprint."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """null: the model's own default (transformers picks per architecture)."""
    gradient_checkpointing: bool = False
    zero_init: bool = True
    """Under ZeRO-3, construct the model partitioned (never whole on one rank)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Train low-rank adapters on the frozen base (model.lora.r > 0); see LoRAConfig."""


DataFormat = Literal[
    "auto",
    "standard",
    "conversational",
    "conversational_implicit",
    "implicit",
    "ultrafeedback",
    "sft_messages",
    "sft_prompt_completion",
    "sft_text",
]  # fpo_ds/data_formats.py describes each


@dataclass(frozen=True)
class MixSource:
    """One source of a data.mix: where its rows come from and how many the mix takes."""

    path: str = dataclasses.field(default=MISSING_REQUIRED)  # type: ignore[assignment]
    """As data.path: a hub data set, a local file, a glob of files or a `save_to_disk` directory."""
    split: str = "train"
    name: str | None = None
    """Hub data set configuration (datasets' `name`)."""
    revision: str | None = None
    weight: float | None = None
    """Share of the mix, relative to the other weighted sources (default 1)."""
    count: int | None = None
    """Exactly this many rows (more than the source has: its rows repeat). Set weight or count."""
    format: DataFormat = "auto"


@dataclass(frozen=True)
class DataConfig:
    """Training rows (preference pairs, or SFT examples) and how they become token ids."""

    path: str | None = None
    """Hub dataset name, a local .jsonl/.json/.parquet/.csv/.arrow file, a glob of such files, or a
    `save_to_disk` dir. Required unless data.mix is set."""
    split: str = "train"
    name: str | None = None
    """Hub data set configuration (datasets' `name`, e.g. a subset of a multi-config set)."""
    revision: str | None = None
    """Hub data set revision (commit, tag or branch)."""
    format: DataFormat = "auto"
    """Row format (fpo_ds/data_formats.py); auto detects it per row and logs it. Forcing one drops
    (or, with on_bad_row=fail, refuses) rows of another shape as wrong_format."""
    mix: list[MixSource] = field(default_factory=list)
    """Several sources mixed (instead of data.path): each with path, split, weight or count, format."""
    max_length: int = 1024
    """Tokens of prompt + response (the longer of chosen/rejected)."""
    max_prompt_length: int = 512
    """Prompt tokens kept (from the right) when prompt + response exceed max_length."""
    max_samples: int | None = None
    """Rows used at most (a mixture: its total, each source keeping its share)."""
    on_bad_row: Literal["drop", "fail"] = "drop"
    seed: int = 0
    """Seed of the per-epoch shuffle of pair order (and of the eval_fraction hold-out and the mix)."""
    eval_split: str | None = None
    """Held-out pairs: this split of data.path (e.g. UltraFeedback's test_prefs). Or use eval_fraction."""
    eval_path: str | None = None
    """Take data.eval_split from this source instead of data.path (e.g. SFT on UltraChat, held out on
    UltraFeedback's test_prefs)."""
    eval_fraction: float | None = None
    """Held-out pairs: this share of data.split's rows (of each mixed source's), seeded by data.seed."""


@dataclass(frozen=True)
class SAEConfig:
    """The sparse autoencoder whose features FPO constrains (method fpo only)."""

    release: str | None = None
    """sae-lens release id (e.g. gemma-scope-2b-pt-res); or leave null and set path."""
    sae_id: str | None = None
    path: str | None = None
    """Local directory written by sae-lens `save_model` (used instead of release/sae_id)."""
    k: int = 50
    """Top-k features of policy and of reference whose union the MSE runs over."""
    feature_weights: str | None = None
    """Optional .pt/.safetensors vector (d_sae,) of per-feature constraint weights."""
    shard_group: str | int = "node"
    """Ranks that split the encoder's features: node (the ranks of one node, from the launcher),
    world, none (every rank holds the whole encoder), or an integer that divides the world. Traffic
    per rank grows with the group, not the world: node keeps it on the node's links at any scale."""


@dataclass(frozen=True)
class CacheConfig:
    """Offline reference cache (reference log-probs and pooled SAE features)."""

    dir: str | None = None
    k_cache: int | None = None
    """Sparse entries kept per pooled feature vector; null means 4 * sae.k."""


@dataclass(frozen=True)
class LossConfig:
    """Which preference objective, and its coefficients."""

    method: Literal["sft", "dpo", "ipo", "simpo", "tdpo1", "tdpo2", "fpo"] = "fpo"
    beta: float | None = None
    """null means the paper's value: 2.0 for simpo, 0.1 otherwise."""
    alpha: float = 0.5
    """Weight of the TDPO-2 / FPO constraint term."""
    gamma_beta_ratio: float = 0.5
    """SimPO margin gamma = beta * gamma_beta_ratio."""
    reference: Literal["live", "offline"] = "live"
    """DPO/IPO: a live reference engine or log-probs from the offline cache."""

    @property
    def resolved_beta(self) -> float:
        return DEFAULT_BETA[self.method] if self.beta is None else self.beta

    @property
    def ref_kind(self) -> Literal["none", "live", "offline"]:
        """No reference, a frozen model run each step, or the offline cache."""
        kind = METHOD_NEEDS[self.method][0]
        return self.reference if kind == "recipe" else kind

    @property
    def needs_kl(self) -> bool:
        """The full-vocabulary KL between the live reference and the policy (TDPO)."""
        return METHOD_NEEDS[self.method][1]

    @property
    def needs_features(self) -> bool:
        """The policy's pooled SAE features at the SAE's block, and the cache's (FPO)."""
        return METHOD_NEEDS[self.method][2]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. Gradient accumulation is derived, never set."""

    global_batch_size: int = 32
    """Pairs per optimizer step across all ranks."""
    micro_batch_size: int = 1
    """Pairs per rank per forward (chosen + rejected = 2x sequences)."""
    lr: float = 5e-7
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    """adamw (the paper's 2B runs) or rmsprop (its 9B runs: one fp32 state per parameter, not two)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    rmsprop_alpha: float = 0.99
    """RMSprop's smoothing constant (torch's default)."""
    warmup_steps: int = 150
    schedule: Literal["constant", "cosine"] = "constant"
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 42
    max_nonfinite_steps: int = 5
    """Halt after this many optimizer steps in a row skipped for a non-finite loss or gradient."""
    eval_every: int = 0
    """Held-out metrics (data.eval_split / data.eval_fraction) every N steps, and at step 0 (the starting
    policy, before any update) when N > 0; after the last step whenever held-out pairs are set (0: end only)."""


@dataclass(frozen=True)
class DeepSpeedConfig:
    """Systems settings live in the JSON; the code fills the batch keys."""

    config: str = "ds_configs/zero3_bf16.json"
    """A JSON of ds_configs/ (or a path), or auto: ZeRO-2 where the model states fit whole on each
    accelerator, else ZeRO-3; bf16 where supported, fp32 on CPU (fpo_ds/zero_auto.py)."""
    timeout_minutes: int = 30
    """Collective timeout: a rank that dies fails the job instead of hanging."""


@dataclass(frozen=True)
class LoggingConfig:
    every: int = 1
    progress_bar: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "fpo-ds"


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/default"
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    save_final: bool = True
    """Checkpoint at the last step (false: a benchmark or sweep that keeps no weights; preemption still saves)."""
    keep_last: int = 2
    resume: str = "auto"
    """auto: newest complete checkpoint in dir if any; never; or a checkpoint path."""
    resume_allow_changes: list[str] = field(default_factory=list)
    """Dotted keys a resume may change although they change the run's meaning (e.g. [loss.beta])."""
    overwrite: bool = False
    """With resume=never in a directory that holds a run: move that run aside (renamed, not deleted)."""


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig
    data: DataConfig
    sae: SAEConfig = field(default_factory=SAEConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ----------------------------------------------------------------------------- building


def _coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check/convert one leaf value against its annotation; append a problem if wrong."""
    if dataclasses.is_dataclass(tp):  # a list of sections (data.mix)
        return _build(tp, value, path, problems)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for tp_i in inner[:-1]:  # the first type the value fits; the last one reports the problem
            trial: list[str] = []
            got = _coerce(value, tp_i, path, trial)
            if not trial:
                return got
        return _coerce(value, inner[-1], path, problems)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{path}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {value!r}")
            return value
        return [_coerce(v, args[0], f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            problems.append(f"{path}: expected a list of {len(args)} numbers, got {value!r}")
            return value
        return tuple(_coerce(v, a, f"{path}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        # PyYAML reads 2e-5 (no dot) as a string: accept numeric strings for floats.
        if isinstance(value, bool):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} at {path}")


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, collecting every problem found."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{path or 'recipe'}: expected a mapping, got {type(raw).__name__}")
        raw = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            dotted = f"{path}.{key}" if path else str(key)
            hint = f" (did you mean {(path + '.' if path else '') + close[0]}?)" if close else ""
            problems.append(f"{dotted}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{path}.{name}" if path else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw.get(name), dotted, problems)
        elif name in raw:
            kwargs[name] = _coerce(raw[name], tp, dotted, problems)
        elif f.default is MISSING_REQUIRED:
            problems.append(f"{dotted}: required key is missing")
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # missing required keys were already reported


def _check(r: Recipe, problems: list[str]) -> None:
    """Cross-field rules that single fields cannot express."""
    d, t, s, lo = r.data, r.train, r.sae, r.loss
    _check_data(d, lo.method, problems)
    for name in ("global_batch_size", "micro_batch_size", "epochs"):
        if getattr(t, name) < 1:
            problems.append(f"train.{name}: must be >= 1, got {getattr(t, name)}")
    if t.micro_batch_size >= 1 and t.global_batch_size % t.micro_batch_size:
        problems.append(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    if not (math.isfinite(t.lr) and t.lr > 0):
        problems.append(f"train.lr: must be a finite number > 0, got {t.lr}")
    if not (math.isfinite(t.rmsprop_alpha) and 0 <= t.rmsprop_alpha < 1):
        problems.append(f"train.rmsprop_alpha: must be in [0, 1), got {t.rmsprop_alpha}")
    if not all(math.isfinite(b) and 0 <= b < 1 for b in t.adam_betas):
        problems.append(f"train.adam_betas: each must be in [0, 1), got {list(t.adam_betas)}")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        problems.append(f"train.weight_decay: must be a finite number >= 0, got {t.weight_decay}")
    if t.max_steps is not None and t.max_steps <= 0:
        problems.append(f"train.max_steps: must be >= 1, got {t.max_steps} (use null for whole epochs)")
    if t.warmup_steps < 0:
        problems.append(f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    if t.max_nonfinite_steps < 1:
        problems.append(f"train.max_nonfinite_steps: must be >= 1, got {t.max_nonfinite_steps}")
    if d.eval_split is not None and d.eval_fraction is not None:
        problems.append("data.eval_split / data.eval_fraction: set one held-out source, not both")
    if d.eval_fraction is not None and not 0 < d.eval_fraction <= 0.5:
        problems.append(f"data.eval_fraction: must be in (0, 0.5], got {d.eval_fraction}")
    if t.eval_every < 0:
        problems.append(f"train.eval_every: must be >= 0 (0: only at the end), got {t.eval_every}")
    if t.eval_every > 0 and d.eval_split is None and d.eval_fraction is None:
        problems.append(
            f"train.eval_every={t.eval_every} needs held-out pairs: set data.eval_split (a split of data.path) "
            "or data.eval_fraction (a share of data.split held out)"
        )
    if r.logging.every < 1:
        problems.append(f"logging.every: must be >= 1 (print every N steps), got {r.logging.every}")
    if r.deepspeed.timeout_minutes < 1:
        problems.append(f"deepspeed.timeout_minutes: must be >= 1, got {r.deepspeed.timeout_minutes}")
    if r.output.save_every < 0:
        problems.append(f"output.save_every: must be >= 0 (0: only at the end), got {r.output.save_every}")
    if r.output.keep_last < 1:
        problems.append(f"output.keep_last: must be >= 1, got {r.output.keep_last}")
    if lo.beta is not None and not (math.isfinite(lo.beta) and lo.beta > 0):
        problems.append(f"loss.beta: must be a finite number > 0, got {lo.beta}")
    if not (math.isfinite(lo.alpha) and lo.alpha >= 0):
        problems.append(f"loss.alpha: must be a finite number >= 0, got {lo.alpha}")
    if lo.method in METHOD_NEEDS:  # an unknown method is reported by its own field
        _check_method_needs(r, problems)
    if s.k < 1:
        problems.append(f"sae.k: must be >= 1, got {s.k}")
    if isinstance(s.shard_group, str) and s.shard_group not in ("node", "world", "none"):
        problems.append(f"sae.shard_group: {s.shard_group!r} is not node, world, none or a rank count")
    if isinstance(s.shard_group, int) and s.shard_group < 1:
        problems.append(f"sae.shard_group: must be >= 1, got {s.shard_group}")
    if r.cache.k_cache is not None and r.cache.k_cache < s.k:
        problems.append(f"cache.k_cache: {r.cache.k_cache} must be >= sae.k ({s.k})")
    if r.output.resume not in ("auto", "never") and not r.output.resume:
        problems.append("output.resume: use auto, never or a checkpoint path")
    _check_lora(r.model.lora, problems)


def _check_method_needs(r: Recipe, problems: list[str]) -> None:
    """What the method needs from the rest of the recipe: an SAE, the offline cache, a live reference."""
    s, lo = r.sae, r.loss
    if lo.needs_features and not (s.path or (s.release and s.sae_id)):
        problems.append(f"sae: method {lo.method} needs an SAE: set sae.path, or sae.release and sae.sae_id")
    if lo.needs_features and not r.cache.dir:
        problems.append(
            f"cache.dir: method {lo.method} needs the offline reference cache (build it with `fpo-ds build-cache`)"
        )
    elif lo.ref_kind == "offline" and not r.cache.dir:
        problems.append("cache.dir: loss.reference=offline needs the offline reference cache")
    if lo.reference == "offline" and lo.needs_kl:
        problems.append("loss.reference: TDPO needs full-vocabulary reference distributions; use live")


# The response log-prob path reads the LM head's weight directly (model.ResponseHead): an adapter
# or a trained copy there would be skipped.
LORA_REFUSED_MODULES = ("lm_head",)


def _check_lora(lo: LoRAConfig, problems: list[str]) -> None:
    if lo.quantize not in (None, False):
        problems.append(
            f"model.lora.quantize: {lo.quantize!r} is not supported: a 4-bit base (QLoRA) needs bitsandbytes on a "
            "GPU, which fpo-ds does not test; remove the key (the base then trains LoRA in the run's precision)"
        )
    if lo.r < 0:
        problems.append(f"model.lora.r: must be >= 0 (0: LoRA off), got {lo.r}")
    if not lo.enabled:
        return
    if not (math.isfinite(lo.alpha) and lo.alpha > 0):
        problems.append(f"model.lora.alpha: must be a finite number > 0, got {lo.alpha}")
    if not (math.isfinite(lo.dropout) and 0 <= lo.dropout < 1):
        problems.append(f"model.lora.dropout: must be in [0, 1), got {lo.dropout}")
    targets = [lo.target_modules] if isinstance(lo.target_modules, str) else list(lo.target_modules)
    if not targets or any(not t for t in targets):
        problems.append("model.lora.target_modules: name modules (e.g. [q_proj, v_proj]) or use all-linear")
    if isinstance(lo.target_modules, str) and lo.target_modules != "all-linear":
        problems.append(
            f"model.lora.target_modules: {lo.target_modules!r}: use all-linear or a list of module names "
            f"(e.g. [{lo.target_modules}])"
        )
    for key, names in (("target_modules", targets), ("modules_to_save", lo.modules_to_save)):
        bad = [n for n in names if n in LORA_REFUSED_MODULES]
        if bad:
            problems.append(
                f"model.lora.{key}: {bad[0]} is not supported: fpo-ds computes log-probs from the LM head's own "
                "weight, so an adapter on it would be ignored; adapt the decoder's modules instead"
            )


def _check_data(d: DataConfig, method: str, problems: list[str]) -> None:
    if d.path is None and not d.mix:
        problems.append("data.path: required key is missing (or list sources under data.mix)")
    if d.path is not None and d.mix:
        problems.append("data.path / data.mix: set one: a single source in data.path, or several in data.mix")
    if d.max_length < 2:
        problems.append(f"data.max_length: must be >= 2 (prompt and response tokens), got {d.max_length}")
    if d.max_prompt_length <= 0:
        problems.append(
            f"data.max_prompt_length: must be >= 1, got {d.max_prompt_length} (a prompt keeps at least its "
            f"last token); e.g. data.max_prompt_length={max(1, d.max_length // 2)}"
        )
    elif d.max_prompt_length >= d.max_length:
        problems.append(
            f"data.max_prompt_length: {d.max_prompt_length} must be < data.max_length ({d.max_length}) "
            "so every kept pair has response tokens"
        )
    if d.max_samples is not None and d.max_samples <= 0:
        problems.append(f"data.max_samples: must be >= 1, got {d.max_samples} (null: every row)")
    if d.eval_path is not None and d.eval_split is None:
        problems.append("data.eval_path: names where data.eval_split comes from; set data.eval_split too")
    if d.eval_split is not None and d.eval_split == d.split and d.eval_path in (None, d.path):
        problems.append(
            f"data.eval_split: {d.eval_split!r} is the training split (data.split): held-out metrics would be "
            "measured on trained rows; name another split, or hold out a share with data.eval_fraction"
        )
    if d.eval_split is not None and d.mix:
        problems.append("data.eval_split: a mixture holds out a share of each source; use data.eval_fraction")
    sft_format = [f for f in [d.format] + [m.format for m in d.mix] if f.startswith("sft_")]
    if sft_format and method != "sft":
        problems.append(
            f"data.format: {sft_format[0]} rows have no rejected response; loss.method={method} needs "
            "preference rows (use loss.method=sft, or another data.format)"
        )
    for i, m in enumerate(d.mix):
        key = f"data.mix[{i}]"
        if (m.weight is None) == (m.count is None):
            problems.append(
                f"{key}: set one of weight (a share of the mix) or count (rows), "
                f"not {'both' if m.weight is not None else 'neither'}"
            )
        if m.weight is not None and not (math.isfinite(m.weight) and m.weight > 0):
            problems.append(f"{key}.weight: must be a finite number > 0, got {m.weight}")
        if m.count is not None and m.count < 1:
            problems.append(f"{key}.count: must be >= 1, got {m.count}")


def recipe_warnings(r: Recipe) -> list[str]:
    """Settings that are legal but probably not meant; training and `fpo-ds validate` print them."""
    out = []
    if r.train.max_steps is not None and r.train.warmup_steps > r.train.max_steps:
        out.append(
            f"train.warmup_steps={r.train.warmup_steps} exceeds train.max_steps={r.train.max_steps}: the lr never "
            f"reaches train.lr (peak {r.train.lr * r.train.max_steps / r.train.warmup_steps:.3g})"
        )
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=c` strings -> nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"override {item!r}: expected key=value, e.g. train.lr=1e-6"], "command line")
        key, value = item.split("=", 1)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value) if value != "" else None
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(raw: dict, source: str = "recipe") -> Recipe:
    problems: list[str] = []
    recipe = _build(Recipe, raw, "", problems)
    if recipe is not None:
        cross: list[str] = []
        try:
            _check(recipe, cross)
        except (TypeError, AttributeError):
            pass  # a field has the wrong type (already reported); cross-field rules can't run
        bad_keys = {p.split(":", 1)[0] for p in problems}
        problems += [c for c in cross if not any(k in c for k in bad_keys)]
    if problems:
        raise ConfigError(problems, source)
    return recipe


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted overrides, validate everything at once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"file not found: {path} (pass a recipe from recipes/)"], str(path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(path)) from None
    raw = _merge(raw, parse_overrides(overrides or []))
    return from_dict(raw, str(path))


def to_dict(recipe: Recipe) -> dict:
    def conv(v: Any) -> Any:
        return list(v) if isinstance(v, (tuple, list)) else v

    return {k: {kk: conv(vv) for kk, vv in v.items()} for k, v in dataclasses.asdict(recipe).items()}


def dump(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe (every default made explicit) next to an output."""
    Path(path).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
