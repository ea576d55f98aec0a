"""How much memory a recipe needs per GPU (and on the host), item by item, and what to change if it does not fit.

Per-GPU memory, itemised:
  model states   DeepSpeed's own ZeRO-3 estimator (fp32 master + Adam + 16-bit params/grads,
                 partitioned over all GPUs, plus the largest layer gathered)
  zero buffers   fp32 gradient partition + 16-bit reduce buffers (calibrated, see estimate())
  reference      live reference (DPO/IPO live, TDPO): its 16-bit params / world + largest layer
  hpz secondary  ZeRO++ hpZ: a second 16-bit copy of the parameters split over the node only
  activations    per decoder layer and token: ACT_BYTES_PER_H * hidden bytes without activation
                 checkpointing (attention scores not kept: sdpa/flash); with checkpointing, each
                 layer keeps its input (2 * hidden bytes) plus one layer's full activations
  logits         one LM-head chunk: min(LOGIT_CHUNK, tokens) positions x vocab x LOGIT_BYTES (the
                 log-probs run on response positions only, a chunk at a time, recomputed in backward)
  SAE shard      d_in * ceil(d_sae / G) fp32 encoder columns, G = the encoder's shard group (FPO)
  SAE encode     the group's response tokens gathered in fp32 (G x tokens x (d_in + 1)), the bits
                 of which features fired (G x tokens x width / 8) and one chunk's pre-activations
                 (CHUNK_TOKENS x width fp32 and its mask) (FPO)
and on the host: the rank's cache part (bytes/pair x pairs / world), and the model states that
offload_optimizer / offload_param in the recipe's DeepSpeed JSON move there. bench/calibrate_plan.py
compares the estimate with the CUDA peaks a bench/gpu.sh run measured.
"""

from __future__ import annotations

import math

from fpo_ds import config as C
from fpo_ds.tools.planner import comms
from fpo_ds.zero_auto import ACT_BYTES_PER_H

# Per logit of one LM-head chunk at backward's peak: the 16-bit matmul output (tanh'd in place under
# softcapping), the fp32 softmax turned into the gradient, Gemma-2's fp32 softcap slope, and the
# gradient cast back to 16 bits for the two matmuls.
LOGIT_BYTES = 2 + 4 + 4 + 2
GIB = 2**30


def estimate(
    recipe: C.Recipe,
    nums: dict,
    nodes: int,
    gpus: int,
    d_sae: int | None = None,
    shard_group: str | int = "node",
    zero: comms.ZeroSettings | None = None,
) -> dict:
    """Bytes per GPU for each item, plus host bytes for the cache part (`zero`: default the recipe's JSON)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from fpo_ds.losses import LOGIT_CHUNK  # here, not at the top: `fpo-ds plan --help` stays fast (no torch)

    world = nodes * gpus
    zero = zero or comms.zero_settings(recipe.deepspeed.config)
    if zero.stage == 2:
        host_states, states = estimate_zero2_model_states_mem_needs(
            nums["params"], gpus, nodes, cpu_offload=zero.offload_optimizer
        )
    else:
        host_states, states, _ = estimate_zero3_model_states_mem_needs(
            nums["params"],
            nums["largest_layer"],
            gpus,
            nodes,
            cpu_offload=zero.offload_optimizer,
            cpu_offload_params=zero.offload_param,
        )
    seqs, length, h, layers = 2 * recipe.train.micro_batch_size, recipe.data.max_length, nums["hidden"], nums["layers"]
    tokens = seqs * length
    if recipe.model.gradient_checkpointing:
        acts = tokens * h * (2 * layers + ACT_BYTES_PER_H)
    else:
        acts = tokens * h * ACT_BYTES_PER_H * layers
    # What DeepSpeed's estimator leaves out: the fp32 gradient partition and the 16-bit reduce /
    # contiguous-gradient buffers (bounded by reduce_bucket_size, 5e8 by default). Calibrated on one
    # measured H200 run (bench/calibrate_plan.py): SFT/SimPO/DPO/TDPO all sat ~10 bytes/param above.
    grad_partition = 0 if zero.offload_optimizer else 4 * nums["params"] // world  # offload keeps it on the host
    buffers = grad_partition + 6 * min(nums["params"], 500_000_000)
    out = {
        "model_states": states,
        "zero_buffers": buffers,
        "activations": acts,
        "logits": min(LOGIT_CHUNK, tokens) * nums["vocab"] * LOGIT_BYTES,
    }
    if recipe.loss.ref_kind == "live":
        out["reference"] = 2 * nums["params"] // world + 2 * nums["largest_layer"]
        if recipe.loss.needs_kl:
            # the KL's chunk: the reference's 16-bit and fp32 logits and the KL's two fp32 temporaries
            out["reference"] += min(LOGIT_CHUNK, tokens) * nums["vocab"] * (2 + 4 + 4 + 4)
    if recipe.loss.needs_features and d_sae:
        out.update(_sae_memory(d_sae, h, tokens, comms.shard_group_size(shard_group, comms.Topology(nodes, gpus))))
        k_cache = recipe.cache.k_cache or 4 * recipe.sae.k
        out["host_cache_per_1k_pairs"] = 1000 * (2 * k_cache * 8 + 32) // world  # fpo_ds/cache.py's row
    if zero.hpz > 1:  # hpZ's secondary copy: every parameter split over the node only, 16-bit
        out["hpz_secondary"] = zero.item * nums["params"] // min(zero.hpz, world)
    if zero.offload_optimizer or zero.offload_param:
        out["host_model_states_per_node"] = int(host_states)
    return out


def _sae_memory(d_sae: int, d_in: int, tokens: int, group: int) -> dict:
    """The encoder slice and its encode buffers on one rank of a shard group of `group` ranks."""
    from fpo_ds.encoder import ShardedEncoder

    width = math.ceil(d_sae / group)
    gathered = group * tokens  # upper bound: every position a response token
    return {
        "sae_shard": d_in * width * 4,
        "sae_encode": gathered * (d_in + 1) * 4 + gathered * width // 8 + ShardedEncoder.CHUNK_TOKENS * width * 5,
    }


def advice(items: dict, recipe: C.Recipe, gpu_bytes: float) -> list[str]:
    """Whether the GPU items fit in 90% of the GPU, and what to change if not."""
    total = sum(v for k, v in items.items() if not k.startswith("host"))
    if total <= 0.9 * gpu_bytes:
        return [f"fits: {total / GIB:.2f} GiB of {gpu_bytes / GIB:.0f} GiB ({100 * total / gpu_bytes:.1f}%)"]
    tips = [f"does NOT fit: {total / GIB:.1f} GiB needed, {gpu_bytes / GIB:.0f} GiB per GPU (keep 10% headroom)"]
    if not recipe.model.gradient_checkpointing:
        tips.append("set model.gradient_checkpointing=true (activations shrink to ~2*hidden bytes per token per layer)")
    if recipe.train.micro_batch_size > 1:
        tips.append("lower train.micro_batch_size (activations and logits scale with it; accumulation grows)")
    tips.append("use more GPUs (model states divide by the GPU count) or ds_configs/zero3_offload_bf16.json")
    if "reference" in items:
        tips.append("DPO/IPO: loss.reference=offline drops the live reference (build the cache first)")
    return tips
