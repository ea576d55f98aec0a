"""`fpo-ds plan RECIPE --nodes N --gpus-per-node G [--gpu-mem GiB]`: will this recipe fit?

Per-GPU memory, itemised:
  model states   DeepSpeed's own ZeRO-3 estimator (fp32 master + Adam + 16-bit params/grads,
                 partitioned over all GPUs, plus the largest layer gathered)
  zero buffers   fp32 gradient partition + 16-bit reduce buffers (calibrated, see estimate())
  reference      live reference (DPO/IPO live, TDPO): its 16-bit params / world + largest layer
  activations    per decoder layer and token: ACT_BYTES_PER_H * hidden bytes without activation
                 checkpointing (attention scores not kept: sdpa/flash); with checkpointing, each
                 layer keeps its input (2 * hidden bytes) plus one layer's full activations
  logits         (2 * micro) sequences x max_length x vocab x LOGIT_BYTES (16-bit logits, their
                 fp32 upcast in log-softmax and its gradient)
  SAE shard      d_in * ceil(d_sae / world) fp32 encoder columns (FPO)
  SAE encode     every rank's response tokens gathered in fp32 (world x tokens x (d_in + 1)), the
                 bits of which features fired (world x tokens x width / 8) and one chunk's
                 pre-activations (CHUNK_TOKENS x width fp32 and its mask) (FPO)
and on the host: the rank's cache part (bytes/pair x pairs / world), and the model states that
offload_optimizer / offload_param in the recipe's DeepSpeed JSON move there. bench/calibrate_plan.py
compares the estimate with the CUDA peaks a bench/gpu.sh run measured.
"""

from __future__ import annotations

import argparse
import math

from fpo_ds import config as C
from fpo_ds.sae import ShardedEncoder

ACT_BYTES_PER_H = 34  # Korthikanti et al. (2022): ~34 s*b*h bytes per layer in 16-bit, no score tensor
LOGIT_BYTES = 2 + 4 + 4
GIB = 2**30


def model_numbers(model_cfg) -> dict:
    """Parameter count and largest layer from the config alone (meta device: no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "largest_layer": largest,
        "hidden": text.hidden_size,
        "layers": text.num_hidden_layers,
        "vocab": text.vocab_size,
    }


def estimate(recipe: C.Recipe, nums: dict, nodes: int, gpus: int, d_sae: int | None = None) -> dict:
    """Bytes per GPU for each item, plus host bytes for the cache part."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    world = nodes * gpus
    zero = zero_settings(recipe.deepspeed.config)
    host_states, states, _ = estimate_zero3_model_states_mem_needs(
        nums["params"],
        nums["largest_layer"],
        gpus,
        nodes,
        cpu_offload=zero["offload_optimizer"],
        cpu_offload_params=zero["offload_param"],
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
    grad_partition = 0 if zero["offload_optimizer"] else 4 * nums["params"] // world  # offload keeps it on the host
    buffers = grad_partition + 6 * min(nums["params"], 500_000_000)
    out = {
        "model_states": states,
        "zero_buffers": buffers,
        "activations": acts,
        "logits": tokens * nums["vocab"] * LOGIT_BYTES,
    }
    method, live = recipe.loss.method, recipe.loss.reference == "live"
    if method in ("tdpo1", "tdpo2") or (method in ("dpo", "ipo") and live):
        out["reference"] = 2 * nums["params"] // world + 2 * nums["largest_layer"]
        if method in ("tdpo1", "tdpo2"):
            out["reference"] += tokens * nums["vocab"] * 4  # the reference's full-vocabulary distributions
    if method == "fpo" and d_sae:
        width = math.ceil(d_sae / world)
        out["sae_shard"] = h * width * 4
        gathered = world * tokens  # upper bound: every position a response token
        out["sae_encode"] = gathered * (h + 1) * 4 + gathered * width // 8 + ShardedEncoder.CHUNK_TOKENS * width * 5
        k_cache = recipe.cache.k_cache or 4 * recipe.sae.k
        out["host_cache_per_1k_pairs"] = 1000 * (2 * k_cache * 8 + 28) // world
    if zero["offload_optimizer"] or zero["offload_param"]:
        out["host_model_states_per_node"] = int(host_states)
    return out


def zero_settings(ds_config: str) -> dict:
    """Offload settings of the recipe's DeepSpeed JSON; the estimate models ZeRO-3 only."""
    import json

    from fpo_ds.ds_config import path as ds_config_path

    path = ds_config_path(ds_config)
    zero = json.loads(path.read_text()).get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ValueError(
            f"deepspeed.config: {path} is ZeRO stage {zero.get('stage')}; fpo-ds plan models ZeRO-3 runs "
            "(pick ds_configs/zero3_*.json)"
        )
    on_host = lambda key: zero.get(key, {}).get("device", "none") in ("cpu", "nvme")  # noqa: E731
    return {"offload_optimizer": on_host("offload_optimizer"), "offload_param": on_host("offload_param")}


def advice(items: dict, recipe: C.Recipe, gpu_bytes: float) -> list[str]:
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fpo-ds plan", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--d-sae", type=int, help="SAE width (default: read from the SAE when loadable)")
    args = p.parse_args(argv)
    recipe = C.load(args.recipe, args.overrides)
    nums = model_numbers(recipe.model)
    d_sae = args.d_sae
    if d_sae is None and recipe.loss.method == "fpo" and recipe.sae.path:
        import json
        from pathlib import Path

        d_sae = json.loads((Path(recipe.sae.path) / "cfg.json").read_text())["d_sae"]
    items = estimate(recipe, nums, args.nodes, args.gpus_per_node, d_sae)
    print(
        f"{recipe.model.name_or_path}: {nums['params'] / 1e6:,.1f}M params, {nums['layers']} layers, "
        f"hidden {nums['hidden']}, vocab {nums['vocab']}; {args.nodes} x {args.gpus_per_node} GPUs"
    )
    for k, v in items.items():
        print(f"  {k:24s} {v / GIB:8.2f} GiB {v / 2**20:12,.1f} MiB")
    for line in advice(items, recipe, args.gpu_mem * GIB):
        print(line)


if __name__ == "__main__":
    main()
