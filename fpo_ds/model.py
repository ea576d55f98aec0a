"""Policy/reference loading under DeepSpeed, per-sequence log-probs, and the residual tap at block L.

Under ZeRO-3 the model is constructed partitioned (transformers' HfDeepSpeedConfig makes
`from_pretrained` run inside `deepspeed.zero.Init`), so a 9B model is never whole on a rank.
Random initialisation never happens here: tiny test models are written to disk first
(see tools/demo/toy.py), which sidesteps transformers' init on already-partitioned embeddings.

Engines are built around `ResponseLM`, whose forward returns per-sequence response log-probs
without the (2b, T, V) logits: the LM head runs on the response positions only, a chunk of
positions at a time (losses.head_outputs). At Gemma-2's 256k vocabulary, micro-batch 2 and 1024
tokens, the full logits alone were 4 x 1024 x 256000 x 4 B = 4 GiB in fp32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch

from fpo_ds import hub
from fpo_ds import losses as L
from fpo_ds.data import IGNORE_INDEX, Batch
from fpo_ds.ds_config import torch_dtype, zero_stage
from fpo_ds.local_paths import WORLD_HINT, looks_local

_PRELOADED = False  # the supported models' code is imported (before any zero.Init)


# What each supported *ForCausalLM.forward (transformers 5.24) applies between the decoder's final
# (normed) hidden state and the logits: a bias-free lm_head, then, for Gemma-2, tanh softcapping
# with this config attribute. Any other type is refused: its forward may scale the logits
# (Cohere's logit_scale, Granite's logits_scaling) and log-probs computed here would differ.
SOFTCAP_ATTR = {"llama": None, "mistral": None, "qwen2": None, "gemma": None, "gemma2": "final_logit_softcapping"}


class RefHead(NamedTuple):
    """What TDPO's full-vocabulary KL needs from the reference; its logits are recomputed per chunk, never stored."""

    hidden: torch.Tensor  # (n, d) the reference's final hidden states at the n response positions
    head: ResponseHead  # the reference's LM head (its weight may be a partitioned ZeRO-3 parameter)


class SeqOut(NamedTuple):
    """Per-sequence statistics of one concatenated (chosen; rejected) forward."""

    sum_logps: torch.Tensor  # (2b,)
    n_tokens: torch.Tensor  # (2b,)
    kl: torch.Tensor | None = None  # (2b,) D_SeqKL(ref || this model), when a reference head was given (TDPO)
    sum_mean_logits: torch.Tensor | None = None  # (2b,) per-position vocabulary-mean logits, summed (no gradient)
    ref_head: RefHead | None = None  # this model as TDPO's reference (keep_hidden=True)


class RefOut(NamedTuple):
    """The reference's per-sequence outputs, from a live engine (objective.LiveReference) or the offline cache."""

    sum_logps: torch.Tensor  # (2b,) summed reference log-probs
    mean_logps: torch.Tensor  # (2b,) per-token mean reference log-probs
    head: RefHead | None = None  # live reference only (TDPO): its hidden states and head, for the KL
    feat_idx: torch.Tensor | None = None  # (2b, k_cache) cached top features (offline cache, FPO)
    feat_val: torch.Tensor | None = None  # (2b, k_cache) their pooled values


class Response(NamedTuple):
    """ResponseLM's output (tensors only, so DeepSpeed's hooks see every one)."""

    sum_logps: torch.Tensor  # (2b,)
    n_tokens: torch.Tensor  # (2b,)
    kl: torch.Tensor | None  # (2b,)
    hidden: torch.Tensor | None  # (n, d) final hidden states at the response positions, detached
    sum_mean_logits: torch.Tensor  # (2b,) vocabulary-mean logits summed over the response, detached


class Logits(NamedTuple):
    logits: torch.Tensor  # (B, T, V) as the Hugging Face forward returns them


def head_softcap(lm) -> float | None:
    """The softcap a supported causal LM applies to its logits (None: none); refuses any other model."""
    kind = getattr(lm.config, "model_type", None)
    if kind not in SOFTCAP_ATTR:
        raise ValueError(
            f"model: {type(lm).__name__} (model_type {kind!r}) is not supported by the response log-prob path; "
            f"supported: {sorted(SOFTCAP_ATTR)}. Add its type to model.SOFTCAP_ATTR after checking what its "
            "forward applies between the last hidden state and the logits"
        )
    if getattr(lm.lm_head, "bias", None) is not None:
        raise ValueError(f"model: {type(lm).__name__} has an lm_head bias; the response log-prob path assumes none")
    attr = SOFTCAP_ATTR[kind]
    return getattr(lm.config, attr, None) if attr else None


def _gathered(param) -> contextlib.AbstractContextManager:
    """All-gather a partitioned ZeRO-3 parameter for the block (collective: every rank enters); else nothing.

    A parameter that is already whole (ZeRO-3 persistent, or any lower stage) is left alone:
    leaving GatheredParameters would partition it again behind its engine's back.
    """
    if not hasattr(param, "ds_status"):
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters([param])


class ResponseHead(torch.nn.Module):
    """The LM head, on the Hugging Face lm_head's own weight (with tied embeddings, the embedding's).

    Called with hidden states only it returns the model's logits (softcapped as its forward
    does). Called with targets it returns per-position log-probs (n,) computed chunk by chunk
    (losses.head_outputs) as (n, 2): log-probs and the vocabulary-mean logit; with a reference
    head, (n, 3): also the KL to the reference.
    Under ZeRO-3 this module's own hooks all-gather the weight before its forward (one gather
    for all chunks) and, unless it is still whole, before its backward, as for the nn.Linear it
    stands in for; the reference's weight, which belongs to another engine, is all-gathered
    around each of the two chunk loops.
    """

    def __init__(self, weight: torch.nn.Parameter, softcap: float | None):
        super().__init__()
        self.weight, self.softcap = weight, softcap

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, ref: RefHead | None = None):
        if targets is None:
            return L.capped_logits(torch.nn.functional.linear(hidden, self.weight), self.softcap)
        pair = (ref.hidden, ref.head.weight) if ref is not None else None
        gather = (lambda: _gathered(ref.head.weight)) if ref is not None else contextlib.nullcontext
        logps, kl, mean_logit = L.head_outputs(hidden, self.weight, targets, self.softcap, pair, gather)
        # One output tensor: ZeRO-3 hooks a module's backward once per output tensor, and a second
        # hook would enter this module twice in its recorded backward trace.
        return torch.stack([logps, mean_logit] + ([kl] if ref is not None else []), -1)


def _per_sequence(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values at the response positions, summed per sequence. (n,), (B, T-1) with n True -> (B,)."""
    return torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask, x).sum(-1)


class ResponseLM(torch.nn.Module):
    """A Hugging Face causal LM whose forward returns summed response log-probs, never full logits.

    Its children are the HF model's decoder (`model`) and a ResponseHead on the HF lm_head's
    weight (`lm_head`), so parameter names and state dicts are the HF model's own (checkpoints
    export to a plain HF model; `decoder_layers` finds the blocks) and a DeepSpeed engine built
    around it hooks both. Called without labels it returns the HF forward's `.logits`.
    """

    def __init__(self, lm):
        super().__init__()
        softcap = head_softcap(lm)
        self.config, self.model = lm.config, lm.model
        self.lm_head = ResponseHead(lm.lm_head.weight, softcap)

    def forward(self, input_ids, attention_mask=None, labels=None, ref: RefHead | None = None, keep_hidden=False):
        """Log-probs of labels[:, 1:] at positions [:, :-1] (shifted as the HF loss does); ignored labels are -100."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if labels is None:
            return Logits(self.lm_head(hidden))
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX  # (B, T-1): the response positions
        h = hidden[:, :-1][mask]  # (n, d), row by row
        out = self.lm_head(h, targets[mask], ref=ref).unbind(-1)  # (n,) x 2, or x 3 with the KL
        logps, mean_logit, kl = out if ref is not None else (*out, None)
        n_tokens = mask.sum(-1).to(logps.dtype)
        kl = _per_sequence(kl, mask) if kl is not None else None
        hidden = h.detach() if keep_hidden else None
        return Response(_per_sequence(logps, mask), n_tokens, kl, hidden, _per_sequence(mean_logit.detach(), mask))


def _preload_model_code() -> None:
    """Import every SOFTCAP_ATTR model's class before zero.Init (lazy imports inside it break its patching)."""
    global _PRELOADED
    if not _PRELOADED:
        import transformers.generation.utils  # noqa: F401
        from transformers import (  # noqa: F401  (one per SOFTCAP_ATTR type; tests/test_model_support.py checks)
            Gemma2ForCausalLM,
            GemmaForCausalLM,
            LlamaForCausalLM,
            MistralForCausalLM,
            Qwen2ForCausalLM,
        )

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
    with from_hub(model_cfg.name_or_path):
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.name_or_path,
            revision=model_cfg.revision,
            dtype=torch_dtype(ds_cfg),
            attn_implementation=model_cfg.attn_implementation,
        )
    model.config.use_cache = False
    return model, keepalive


def frozen_engine(model_cfg, ds_cfg: dict, whole: bool = False):
    """A reference model as a DeepSpeed engine in eval mode, no optimizer (collective).

    Sharded like the policy under ZeRO-3 unless `whole`; with a lower stage, or `whole`, it is
    simply replicated (stage 0): a small frozen model needs no per-module all-gathers.
    """
    import deepspeed

    cfg = {k: v for k, v in ds_cfg.items() if k not in ("gradient_clipping", "zero_allow_untested_optimizer")}
    if zero_stage(ds_cfg) != 3 or whole:
        cfg["zero_optimization"] = {"stage": 0}
    model, keepalive = load_model(model_cfg, cfg)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=ResponseLM(model), config=cfg)
    engine.eval()
    del keepalive
    return engine


def check_model_path(name_or_path: str) -> None:
    """A local-looking path that does not exist is a typo, not a hub id: say so before the hub is tried."""
    p = Path(name_or_path)
    if looks_local(name_or_path) and not p.exists():
        raise FileNotFoundError(
            f"model.name_or_path: {name_or_path} does not exist under {Path.cwd()} (a local directory was "
            f"expected): pass model.name_or_path=<save_pretrained directory or hub id>. {WORLD_HINT}"
        )
    if p.is_dir() and not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(f"model.name_or_path: {name_or_path} has no config.json (not a save_pretrained dir)")


def from_hub(name_or_path: str):
    """Around a from_pretrained: a hub id that fails to load names model.name_or_path and the fixes."""
    if Path(name_or_path).exists():
        return contextlib.nullcontext()  # a local directory: its own errors say what is wrong with it
    return hub.named("model.name_or_path", name_or_path, "model.name_or_path=<save_pretrained directory>")


def load_config(model_cfg):
    check_model_path(model_cfg.name_or_path)
    from transformers import AutoConfig

    with from_hub(model_cfg.name_or_path):
        return AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision)


def load_tokenizer(name_or_path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    check_model_path(name_or_path)
    with from_hub(name_or_path):
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


def sequence_logps(model, batch: Batch, ref: RefHead | None = None, keep_hidden: bool = False) -> SeqOut:
    """One forward over chosen+rejected; summed response log-probs per sequence.

    Args:
        model: a DeepSpeed engine built around ResponseLM, a ResponseLM, or a plain (unpartitioned)
            Hugging Face causal LM, wrapped here without copying a weight.
        batch: (2b, T) ids, attention mask and labels (-100 outside the responses).
        ref: the reference's RefHead: also D_SeqKL(ref || model) per sequence (TDPO).
        keep_hidden: return this model's RefHead, to serve as TDPO's reference.
    """
    lm = getattr(model, "module", model)
    if not isinstance(lm, ResponseLM):
        if lm is not model:
            raise TypeError(f"sequence_logps: the engine wraps {type(lm).__name__}; build it around model.ResponseLM")
        model = lm = ResponseLM(model)
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=batch.labels,
        ref=ref,
        keep_hidden=keep_hidden,
    )
    ref_head = RefHead(out.hidden, lm.lm_head) if keep_hidden else None
    return SeqOut(out.sum_logps, out.n_tokens, out.kl, out.sum_mean_logits, ref_head)


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
