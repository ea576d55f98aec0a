"""Policy/reference loading under DeepSpeed, per-sequence log-probs, and the residual tap at block L.

Under ZeRO-3 the model is constructed partitioned (transformers' HfDeepSpeedConfig makes
`from_pretrained` run inside `deepspeed.zero.Init`), so a 9B model is never whole on a rank.
Random initialisation never happens here: tiny test models are written to disk first
(see tools/toy.py), which sidesteps transformers' init on already-partitioned embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from fpo_ds.config import WORLD_HINT
from fpo_ds.data import Batch
from fpo_ds.ds_config import torch_dtype, zero_stage
from fpo_ds.losses import IGNORE_INDEX, token_logps

# Models whose code must be imported before zero.Init patches tensor constructors.
_PRELOADED = False


class SeqOut(NamedTuple):
    """Per-sequence statistics of one concatenated (chosen; rejected) forward."""

    sum_logps: torch.Tensor  # (2b,)
    n_tokens: torch.Tensor  # (2b,)
    logits: torch.Tensor | None  # (2b, T-1, V), kept only when a loss needs full distributions
    mask: torch.Tensor  # (2b, T-1) response-token mask aligned with logits
    features: torch.Tensor | None = None  # (2b, d_sae) pooled SAE features (FPO; set by the trainer)


def _preload_model_code() -> None:
    """Import model classes before zero.Init (lazy imports inside it break its patching)."""
    global _PRELOADED
    if not _PRELOADED:
        import transformers.generation.utils  # noqa: F401
        from transformers import Gemma2ForCausalLM, LlamaForCausalLM  # noqa: F401

        _PRELOADED = True


def load_model(model_cfg, ds_cfg: dict):
    """from_pretrained, partitioned at construction under ZeRO-3 (collective: call on every rank).

    Returns (model, keepalive): keep `keepalive` referenced until deepspeed.initialize ran.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    _preload_model_code()
    check_model_path(model_cfg.name_or_path)
    keepalive = HfDeepSpeedConfig(ds_cfg) if zero_stage(ds_cfg) == 3 and model_cfg.zero_init else None
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.name_or_path,
        revision=model_cfg.revision,
        dtype=torch_dtype(ds_cfg),
        attn_implementation=model_cfg.attn_implementation,
    )
    model.config.use_cache = False
    return model, keepalive


def frozen_engine(model_cfg, ds_cfg: dict):
    """A reference model as a DeepSpeed engine in eval mode, no optimizer (collective).

    Sharded like the policy under ZeRO-3; with a lower stage it is simply replicated (stage 0).
    """
    import deepspeed

    cfg = {k: v for k, v in ds_cfg.items() if k not in ("gradient_clipping", "zero_allow_untested_optimizer")}
    if zero_stage(ds_cfg) != 3:
        cfg["zero_optimization"] = {"stage": 0}
    model, keepalive = load_model(model_cfg, cfg)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    del keepalive
    return engine


def check_model_path(name_or_path: str) -> None:
    """A local-looking path that does not exist is a typo, not a hub id: say so before the hub is tried."""
    p = Path(name_or_path)
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_local and not p.exists():
        raise FileNotFoundError(
            f"model.name_or_path: {name_or_path} does not exist under {Path.cwd()} (a local directory was "
            f"expected): pass model.name_or_path=<save_pretrained directory or hub id>. {WORLD_HINT}"
        )
    if p.is_dir() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.name_or_path: {name_or_path} has no config.json (not a save_pretrained dir)")


def load_config(model_cfg):
    check_model_path(model_cfg.name_or_path)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision)


def load_tokenizer(name_or_path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    check_model_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    if tok.chat_template is None:
        raise ValueError(
            f"model.name_or_path: the tokenizer of {name_or_path} has no chat template; "
            "use an instruction/SFT checkpoint or one whose tokenizer_config sets chat_template"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def to_device(batch: Batch, device) -> Batch:
    return Batch(*(t.to(device, non_blocking=True) for t in batch))


def sequence_logps(model, batch: Batch, keep_logits: bool = False) -> SeqOut:
    """One forward over chosen+rejected; summed response log-probs per sequence."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    labels = batch.labels[:, 1:]
    mask = labels != IGNORE_INDEX
    tok = token_logps(logits, labels)
    return SeqOut(tok.sum(-1), mask.sum(-1).to(tok.dtype), logits if keep_logits else None, mask)


def decoder_layers(model):
    """The list of decoder blocks of a Hugging Face causal LM (Llama, Gemma2, Mistral, Qwen2 ...)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find decoder blocks at model.model.layers")
    return layers


class ResidualTap:
    """Reads the residual stream at the output of decoder block L (before any final norm).

    A forward hook on block L stores its output once per `arm()`. With activation
    checkpointing the block runs again during backward; the tap is disarmed by then, so the
    recomputed output is neither stored nor counted twice.
    """

    def __init__(self, model, layer: int):
        self.layer, self.armed, self.value = layer, False, None
        self.handle = decoder_layers(model)[layer].register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if self.armed:
            self.value = output[0] if isinstance(output, tuple) else output
            self.armed = False

    def arm(self) -> None:
        self.armed, self.value = True, None

    def take(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError(f"residual tap at block {self.layer} did not fire during the forward pass")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.handle.remove()
