"""`deepspeed.config: auto`: pick the ZeRO stage, precision and bucket sizes for this model and machine.

Each ZeRO stage trades communication for memory: ZeRO-2 partitions gradients and optimizer states
(a reduce-scatter and an all-gather per step instead of one all-reduce, plus its partition
bookkeeping), ZeRO-3 also the parameters (every module all-gathered in forward and backward: on
small models that doubles the step time). None of it pays while the states fit whole. So auto
takes the first rung whose per-rank peak fits in FIT_FRACTION of a rank's memory:

    stage 0 (data parallel, as DDP)    every state whole on every rank
    ZeRO-2                             optimizer states over the N ranks
    ZeRO-3                             otherwise

Per rank (w: 2 bytes per parameter in bf16, 4 in fp32):

    weights            P x w
    gradients          P x w             (whole before the all-reduce / reduce-scatter)
    optimizer states   P x (8 + m)       (Adam's two fp32 moments; m = 4 for bf16's fp32 master copy),
                                          / N under ZeRO-2
    live reference     P x w             (DPO/IPO with loss.reference=live, TDPO)
    activations        tokens x hidden x ACT_BYTES_PER_H x layers (x w / 2), or with checkpointing
                       tokens x hidden x (2 x layers + ACT_BYTES_PER_H) (x w / 2)
    logits             one LM-head chunk: min(LOGIT_CHUNK, tokens) x vocab x 12 bytes

With LoRA (model.lora) only the T adapter parameters train: weights (P + T) x w, gradients T x w,
optimizer states T x (8 + m), and no live reference (the base with its adapters off is the reference).

Memory is the accelerator's (CUDA: the device's total), on the CPU accelerator the host's RAM
shared by the node's ranks. Precision: bf16 where the accelerator supports it, fp32 on the CPU.
Buckets: DeepSpeed's defaults (5e8 elements) size buffers for billion-parameter models; auto caps
them at the model's parameter count. A resumed run keeps the choice its checkpoint was saved under.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple

ACT_BYTES_PER_H = 34  # Korthikanti et al. (2022): ~34 s*b*h bytes per layer in 16-bit, no score tensor
FIT_FRACTION = 0.8  # headroom for the allocator, the comm buffers and what the estimate leaves out
DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce/allgather bucket default (elements)


class ModelFacts(NamedTuple):
    params: int
    hidden: int
    layers: int
    vocab: int


class Choice(NamedTuple):
    systems: dict  # the DeepSpeed JSON auto stands for (no batch keys)
    reason: str  # one line for the log and run_info.json


def saved_params(model_dir: Path) -> int:
    """Parameters of a saved model, counted from its safetensors headers (no weights read); 0 if none."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total


def model_facts(model_cfg) -> ModelFacts:
    """Parameter count and shape of the model (no weights read).

    From a local directory's safetensors headers and config.json; else (a hub id) from its config
    built on the meta device.
    """
    local = Path(model_cfg.name_or_path)
    params = saved_params(local) if (local / "config.json").is_file() else 0
    if params:
        cfg = json.loads((local / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        return ModelFacts(params, cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"])
    import torch
    from transformers import AutoModelForCausalLM

    from fpo_ds import model as M

    cfg = M.load_config(model_cfg)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg)
    params = sum(p.numel() for p in lm.parameters())
    return ModelFacts(params, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size)


def rank_bytes(recipe, facts: ModelFacts, world: int, item: int, stage: int, trainable: int | None = None) -> dict:
    """Per-rank peak items at ZeRO `stage` 0 or 2 (module docstring); `item`: bytes per parameter (2 or 4).

    `trainable`: the LoRA adapters' parameter count (None: every parameter trains).
    """
    from fpo_ds.losses import LOGIT_CHUNK

    p = facts.params
    t = p if trainable is None else trainable
    master = 4 if item == 2 else 0
    tokens = 2 * recipe.train.micro_batch_size * recipe.data.max_length
    per_layer = (
        2 * facts.layers + ACT_BYTES_PER_H if recipe.model.gradient_checkpointing else (ACT_BYTES_PER_H * facts.layers)
    )
    out = {
        "weights": (p if trainable is None else p + t) * item,
        "gradients": t * item,
        "optimizer": t * (8 + master) // (world if stage else 1),
        "activations": tokens * facts.hidden * per_layer * item // 2,
        "logits": min(LOGIT_CHUNK, tokens) * facts.vocab * 12,
    }
    if trainable is None and recipe.loss.ref_kind == "live":
        out["reference"] = p * item
    return out


def choose(
    recipe, facts: ModelFacts, world: int, memory_bytes: int, bf16: bool, trainable: int | None = None
) -> Choice:
    """The first of stage 0, ZeRO-2 whose per-rank peak fits in FIT_FRACTION of `memory_bytes`; else ZeRO-3.

    `trainable`: LoRA's adapter parameter count (None: full-parameter training).
    """
    item = 2 if bf16 else 4
    need = {stage: sum(rank_bytes(recipe, facts, world, item, stage, trainable).values()) for stage in (0, 2)}
    stage = next((st for st in (0, 2) if need[st] <= FIT_FRACTION * memory_bytes), 3)
    bucket = int(min(DEFAULT_BUCKET, max(facts.params, 1)))
    zero: dict = {"stage": stage}
    if stage == 2:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=bucket)
        zero["allgather_bucket_size"] = bucket
    elif stage == 3:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=bucket)
        zero["stage3_prefetch_bucket_size"] = int(min(50_000_000, bucket))
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    systems = {"zero_optimization": zero, "gradient_clipping": 1.0}
    if bf16:
        systems["bf16"] = {"enabled": True}
    gib, limit = 2**30, FIT_FRACTION * memory_bytes
    name = {0: "stage 0 (data parallel, no ZeRO)", 2: "ZeRO-2", 3: "ZeRO-3"}[stage]
    reason = (
        f"deepspeed.config=auto: {name}, {'bf16' if bf16 else 'fp32'}: {facts.params:,} parameters"
        f"{f' ({trainable:,} of them LoRA adapters that train)' if trainable is not None else ''} need "
        f"~{need[0] / gib:.2f} GiB per rank whole, ~{need[2] / gib:.2f} GiB under ZeRO-2; "
        f"{FIT_FRACTION:.0%} of {memory_bytes / gib:.1f} GiB per rank is {limit / gib:.1f} GiB"
    )
    return Choice(systems, reason)


WHOLE_REFERENCE_FRACTION = 0.02  # a frozen reference this small (of a rank's memory) is replicated, not sharded


def reference_whole(model_cfg, ds_cfg: dict, accelerator: str, local_world: int) -> tuple[bool, str]:
    """Whether a frozen reference is kept whole on every rank rather than ZeRO-3-sharded, and why.

    Sharding a frozen model saves its (16-bit) weights over the ranks but costs two all-gathers
    per module per forward; below WHOLE_REFERENCE_FRACTION of a rank's memory the weights are cheaper.
    """
    from fpo_ds.ds_config import torch_dtype, zero_stage

    if zero_stage(ds_cfg) != 3:
        return False, ""
    item = torch_dtype(ds_cfg).itemsize
    size = model_facts(model_cfg).params * item
    limit = WHOLE_REFERENCE_FRACTION * rank_memory(accelerator, local_world)
    whole = size <= limit
    how = "whole on every rank (replicated)" if whole else "ZeRO-3-sharded"
    return whole, f"reference: {size / 2**20:.0f} MiB of weights, {how} (limit {limit / 2**20:.0f} MiB per rank)"


def rank_memory(accelerator: str, local_world: int) -> int:
    """Bytes one rank may use: the CUDA device's total, or on the CPU the host's RAM over the node's ranks."""
    if accelerator == "cuda":
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local_world, 1)


def resolve(recipe, world: int, local_world: int) -> Choice:
    """The choice for this run: model facts from its config, memory and precision from the accelerator."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name = acc.device_name()
    bf16 = name != "cpu" and acc.is_bf16_supported()
    trainable = None
    if recipe.model.lora.enabled:
        from fpo_ds import lora

        trainable = lora.count_trainable(recipe.model)
    return choose(recipe, model_facts(recipe.model), world, rank_memory(name, local_world), bf16, trainable)
