"""Architecture facts for planning offline: the shipped recipes' hub models and their SAEs' widths.

`fpo-ds plan` builds the model on the meta device (no weights, no network) from a transformers
config. A local `model.name_or_path` directory gives its own config.json; for the recipes' hub ids
the config.json fields that fix the shapes are kept here, copied from the public model cards'
config.json (param counts checked: tests/test_plan.py). The SAE width comes from sae-lens's
shipped registry (pretrained_saes.yaml, read without importing sae_lens), a local `sae.path`'s
cfg.json, or the caller.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import NamedTuple

# config.json fields (public values) that shape the parameters and the attention cost. Gemma 2 ties
# the output layer to the embedding (transformers' Gemma2Config default); Llama 3.1 does not.
_GEMMA2 = {  # what Gemma-2 2B and 9B share
    "model_type": "gemma2",
    "head_dim": 256,
    "vocab_size": 256000,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "max_position_embeddings": 8192,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
}
HUB_CONFIGS: dict[str, dict] = {
    "google/gemma-2-2b": {  # 2,614,341,888 parameters
        **_GEMMA2,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
    "google/gemma-2-9b": {  # 9,241,705,984 parameters
        **_GEMMA2,
        "hidden_size": 3584,
        "intermediate_size": 14336,
        "num_hidden_layers": 42,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
    },
    "meta-llama/Llama-3.1-8B": {  # 8,030,261,248 parameters
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
    },
}


def model_config(name_or_path: str):
    """A transformers config without the network: a local directory's config.json, or a known hub id."""
    from transformers import AutoConfig

    if Path(name_or_path).is_dir():
        if not (Path(name_or_path) / "config.json").is_file():
            raise FileNotFoundError(
                f"model.name_or_path: {name_or_path} has no config.json (not a save_pretrained dir)"
            )
        return AutoConfig.from_pretrained(name_or_path)
    if name_or_path not in HUB_CONFIGS:
        from fpo_ds.local_paths import WORLD_HINT

        looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
        raise ValueError(
            f"model.name_or_path: {name_or_path!r} is neither a local directory nor a hub model whose shapes "
            f"fpo-ds plan ships ({', '.join(HUB_CONFIGS)}). Plan offline with a local copy: pass "
            "model.name_or_path=<directory holding its config.json> (only config.json is read)"
            + (f". {WORLD_HINT}" if looks_local else "")
        )
    fields = dict(HUB_CONFIGS[name_or_path])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


# ----------------------------------------------------------------------------- SAE width


def _thousands(count: str, unit: str) -> int:
    """Gemma Scope / Neuronpedia width names: '16k' is 2^14 = 16384, '1m' is 2^20.

    The names round a power of two to thousands; take the power of two within 5% of the named
    count, else the count itself.
    """
    n = int(count) * (1000 if unit == "k" else 1_000_000)
    p2 = 2 ** round(math.log2(n))
    return p2 if abs(p2 - n) <= 0.05 * n else n


def width_from_registry(release: str, sae_id: str, d_in: int) -> int | None:
    """d_sae of a published SAE from its registry entry's names, or None if they do not say.

    The registry has no d_sae field; the width is in the names: Gemma Scope ids carry
    `width_16k`, Neuronpedia ids `-res-32k`, and Llama Scope ids the expansion factor (`l31r_8x`
    is 8 x d_in features).
    """
    from fpo_ds.sae import registry_entry  # the core's one reader of sae-lens's registry

    entry = registry_entry(release, sae_id)
    if entry is None:
        return None
    names = " ".join(str(entry.get(k, "")) for k in ("id", "path", "neuronpedia"))
    named = re.search(r"width_(\d+)([km])\b", names) or re.search(r"-(\d+)([km])\b", names)
    if named:
        return _thousands(*named.groups())
    factor = re.search(r"_(\d+)x$", sae_id)
    return int(factor.group(1)) * d_in if factor else None


def sae_width(sae_cfg, d_in: int, override: int | None = None) -> tuple[int | None, str]:
    """(d_sae, where it came from): the override, the registry, then a local sae.path's cfg.json."""
    if override:
        return override, "--d-sae"
    if sae_cfg.release and sae_cfg.sae_id:
        width = width_from_registry(sae_cfg.release, sae_cfg.sae_id, d_in)
        if width:
            return width, f"sae-lens registry ({sae_cfg.release}/{sae_cfg.sae_id})"
    if sae_cfg.path and (Path(sae_cfg.path) / "cfg.json").is_file():
        return json.loads((Path(sae_cfg.path) / "cfg.json").read_text())["d_sae"], f"{sae_cfg.path}/cfg.json"
    return None, "unknown"


def sae_topk(sae_cfg) -> int:
    """The k of a TopK SAE (its forward gathers each token's local top-k); 0 for other architectures.

    Only a local cfg.json says; the recipes' published SAEs (Gemma Scope, Llama Scope) are JumpReLU.
    """
    if sae_cfg.path and (Path(sae_cfg.path) / "cfg.json").is_file():
        cfg = json.loads((Path(sae_cfg.path) / "cfg.json").read_text())
        return int(cfg.get("k") or 0) if cfg.get("architecture") == "topk" else 0
    return 0


# ----------------------------------------------------------------------------- the meta model


class Call(NamedTuple):
    """One module call of a forward pass, as ZeRO-3 sees it: the module's own parameters, its calls."""

    params: tuple[int, ...]  # indices into ModelShape.numels of the module's direct parameters
    children: tuple[Call, ...]
    checkpointed: bool  # a decoder layer: activation checkpointing recomputes it in backward


class ModelShape(NamedTuple):
    """What the planner needs of a model, read from its meta-device instance."""

    params: int
    largest_layer: int  # most parameters held directly by one module (ZeRO-3 gathers per module)
    hidden: int
    layers: int
    vocab: int
    heads: int
    head_dim: int
    matmul_params: int  # parameters used in a matmul per token: all but an untied input embedding
    numels: tuple[int, ...]  # every distinct parameter's element count, in creation order
    dims: tuple[tuple[int, ...], ...]  # their shapes
    forward: Call  # the call tree of one forward pass


def _call_tree(model, index: dict[int, int]) -> Call:
    """Run a 1 x 8-token forward on the meta device and record the module calls (pre/post hooks)."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    stack: list[list] = [[(), [], False]]

    def enter(module, args):
        own = tuple(index[id(p)] for p in module.parameters(recurse=False))
        stack.append([own, [], isinstance(module, GradientCheckpointingLayer)])

    def leave(module, args, out):
        own, children, ckpt = stack.pop()
        stack[-1][1].append(Call(own, tuple(children), ckpt))

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules()]
    hooks += [m.register_forward_hook(leave) for m in model.modules()]
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta"))
    for h in hooks:
        h.remove()
    return stack[0][1][0]


def model_shape(name_or_path: str) -> ModelShape:
    """Parameter sizes and the forward call tree of the model, built on the meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model_config(name_or_path)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    params = list(model.parameters())  # tied weights appear once
    index = {id(p): i for i, p in enumerate(params)}
    embed = model.get_input_embeddings().weight
    untied = model.get_output_embeddings() is None or model.get_output_embeddings().weight is not embed
    heads = text.num_attention_heads
    return ModelShape(
        params=sum(p.numel() for p in params),
        largest_layer=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        vocab=text.vocab_size,
        heads=heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        matmul_params=sum(p.numel() for p in params) - (embed.numel() if untied else 0),
        numels=tuple(p.numel() for p in params),
        dims=tuple(tuple(p.shape) for p in params),
        forward=_call_tree(model, index),
    )
