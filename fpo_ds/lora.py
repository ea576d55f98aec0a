"""LoRA through PEFT: wrap the policy, switch its adapters off for the reference, save only the adapters.

The recipe's `model.lora` block becomes a PEFT LoraConfig; `wrap` injects the adapter layers into
the loaded Hugging Face model (in place: parameter names gain `.base_layer.` / `.lora_A.default.`)
and freezes every base weight, before deepspeed.initialize. The engine is then built around the
same model, so DeepSpeed partitions the frozen base like any weight and keeps gradients and
optimizer states for the adapters only.

The reference of live-reference methods (DPO, IPO, TDPO) is the base model: the same engine run
under `adapters_off`, as TRL does with a PEFT model. No second copy of the weights is loaded.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from fpo_ds import config as C


def peft_config(lora_cfg: C.LoRAConfig):
    """model.lora -> peft.LoraConfig for a causal LM."""
    from peft import LoraConfig

    targets = lora_cfg.target_modules
    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        modules_to_save=list(lora_cfg.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap(model, lora_cfg: C.LoRAConfig, seed: int | None = None):
    """Inject the adapters into `model` in place and freeze the base; returns the PeftModel around it.

    The Hugging Face model itself (`peft_model.get_base_model()`, the same object as `model`) is what
    the engine wraps, so parameter names stay the model's own plus PEFT's adapter suffixes.
    `seed`: the adapters' initial values are drawn from this seed alone (not from whatever the RNG
    state was after loading), so any process that wraps the same model with the same seed (another
    world size, ZeRO stage, or TRL given these adapters) starts from the same adapters.
    """
    from peft import get_peft_model

    tied = getattr(model.config, "tie_word_embeddings", False) or getattr(
        getattr(model.config, "text_config", None), "tie_word_embeddings", False
    )
    embedding = model.get_input_embeddings()
    names = [n for n, m in model.named_modules() if m is embedding]
    emb = names[0].rsplit(".", 1)[-1] if names else "embed_tokens"
    chosen = list(lora_cfg.modules_to_save) + (
        [] if isinstance(lora_cfg.target_modules, str) else list(lora_cfg.target_modules)
    )
    if tied and emb in chosen:
        raise ValueError(
            f"model.lora: {emb} is tied to the LM head in {type(model).__name__} (tie_word_embeddings); training it "
            "would change the head behind the response log-prob path. Leave it out of model.lora.target_modules "
            "and model.lora.modules_to_save"
        )
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # PEFT asks by an old name
            if seed is not None:
                torch.manual_seed(seed)
            peft_model = get_peft_model(model, peft_config(lora_cfg))
    except ValueError as e:  # e.g. a target name the model does not have
        raise ValueError(f"model.lora: PEFT could not adapt {type(model).__name__}: {e}") from None
    return peft_model


def trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train (adapters and modules_to_save), by name."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def adapter_layers(module: torch.nn.Module) -> list:
    """PEFT's switchable layers: the adapter layers and the modules_to_save wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [m for m in module.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


@contextlib.contextmanager
def adapters_off(module: torch.nn.Module) -> Iterator[None]:
    """Run `module` as its base model: every adapter layer (and modules_to_save copy) bypassed.

    PEFT's own switch (what PeftModel.disable_adapter does), applied to the layers of the module
    the engine wraps. Disabling also clears the adapters' requires_grad; enabling restores it.
    """
    layers = adapter_layers(module)
    if not layers:
        raise RuntimeError("adapters_off: the model has no LoRA layers (model.lora.r is 0?)")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def count_trainable(model_cfg, hf_config=None) -> int:
    """Parameters model.lora trains on this model: the adapters built on the meta device (no weights read).

    `hf_config`: the model's transformers config (default: read from model.name_or_path).
    """
    from transformers import AutoModelForCausalLM

    from fpo_ds import model as M

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hf_config or M.load_config(model_cfg))
        wrap(lm, model_cfg.lora)
    return sum(p.numel() for p in lm.parameters() if p.requires_grad)


def numel(p: torch.nn.Parameter) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (then `numel()` is 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def summary(module: torch.nn.Module, lora_cfg: C.LoRAConfig) -> str:
    """One log line: how many parameters train, of how many."""
    params = list(module.parameters())
    total = sum(numel(p) for p in params)
    train = sum(numel(p) for p in params if p.requires_grad)
    targets = lora_cfg.target_modules if isinstance(lora_cfg.target_modules, str) else ",".join(lora_cfg.target_modules)
    return (
        f"LoRA (PEFT): r {lora_cfg.r}, alpha {lora_cfg.alpha:g}, dropout {lora_cfg.dropout:g}, targets {targets}: "
        f"{train:,} of {total:,} parameters train ({100 * train / max(total, 1):.2f}%), the base is frozen"
    )


def is_adapter_dir(path) -> bool:
    """A directory written by PEFT's save_pretrained (`fpo-ds export --form adapter`)."""
    from pathlib import Path

    return (Path(path) / "adapter_config.json").is_file()


def load_causal_lm(path, dtype: torch.dtype = torch.float32):
    """A Hugging Face causal LM from a model directory, or from a LoRA adapter directory (merged into its base).

    What `fpo-ds generate` and `fpo-ds eval` load: an exported full or merged model as it is; an
    adapter on the base model its adapter_config.json names, merged for plain inference.
    """
    from transformers import AutoModelForCausalLM

    if not is_adapter_dir(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    import json
    from pathlib import Path

    from peft import PeftModel

    base_name = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{path}: adapter_config.json names no base_model_name_or_path; set it to the base model")
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype)
    return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
