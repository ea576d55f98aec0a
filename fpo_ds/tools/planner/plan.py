"""`fpo-ds plan RECIPE --nodes N --gpus-per-node G`: will this recipe fit, and how fast will it run?

Works offline: the model is built on the meta device from its config (a local directory's
config.json, or the shapes shipped in fpo_ds/tools/planner/shapes.py for the recipes' hub models), the SAE
width comes from sae-lens's registry (or `sae.path`/cfg.json, or --d-sae).

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

Then the bytes of every collective per step and rank, the step time they and the compute give,
and a weak-scaling table over 1-64 nodes (fpo_ds/tools/planner/comms.py holds the model and its sources).
"""

from __future__ import annotations

import argparse
import math

from fpo_ds import config as C
from fpo_ds.tools.planner import comms
from fpo_ds.zero_auto import ACT_BYTES_PER_H

# Per logit of one LM-head chunk at backward's peak: the 16-bit matmul output (tanh'd in place under
# softcapping), the fp32 softmax turned into the gradient, Gemma-2's fp32 softcap slope, and the
# gradient cast back to 16 bits for the two matmuls.
LOGIT_BYTES = 2 + 4 + 4 + 2
GIB = 2**30
EXIT_DOES_NOT_FIT = 3
GB = 1e9


def estimate(
    recipe: C.Recipe, nums: dict, nodes: int, gpus: int, d_sae: int | None = None, shard_group: str | int = "node"
) -> dict:
    """Bytes per GPU for each item, plus host bytes for the cache part."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from fpo_ds.losses import LOGIT_CHUNK  # here, not at the top: `fpo-ds plan --help` stays fast (no torch)

    world = nodes * gpus
    zero = comms.zero_settings(recipe.deepspeed.config)
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
    method, live = recipe.loss.method, recipe.loss.reference == "live"
    if method in ("tdpo1", "tdpo2") or (method in ("dpo", "ipo") and live):
        out["reference"] = 2 * nums["params"] // world + 2 * nums["largest_layer"]
        if method in ("tdpo1", "tdpo2"):
            # the KL's chunk: the reference's 16-bit and fp32 logits and the KL's two fp32 temporaries
            out["reference"] += min(LOGIT_CHUNK, tokens) * nums["vocab"] * (2 + 4 + 4 + 4)
    if method == "fpo" and d_sae:
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
    from fpo_ds.sae import ShardedEncoder

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


# ----------------------------------------------------------------------------- communication and time


def comm_table(step: comms.StepPlan, topo: comms.Topology) -> list[str]:
    """One line per collective class and link: calls, bytes received, over the in-node links / the NIC, seconds."""
    rows: dict[tuple, list[float]] = {}
    for t in step.traffic:
        nvlink, nic = comms.link_bytes(t)
        row = rows.setdefault((t.name, t.link, t.kind), [0.0] * 5)
        for i, v in enumerate((t.calls, t.received, nvlink, nic, comms.seconds(t, topo))):
            row[i] += v
    head = (
        f"  {'collective':26s} {'group':>16s} {'calls':>7s} {'received':>10s} {'in-node':>10s} {'NIC':>10s} {'s':>8s}"
    )
    lines = [head]
    for (name, link, kind), (calls, got, nvlink, nic, sec) in rows.items():
        where = "host" if kind == "host" else f"{link.group} ({link.nodes} node{'s' * (link.nodes > 1)})"
        sizes = " ".join(f"{size(b):>10s}" for b in (got, nvlink, nic))
        lines.append(f"  {name:26s} {where:>16s} {calls:7.0f} {sizes} {sec:8.3g}")
    return lines


def _secs(s: float) -> str:
    return f"{s:.3f} s" if s >= 0.01 else f"{s:.2g} s"


def size(b: float) -> str:
    """Bytes in decimal units: 81.87 GB, 333.3 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.4g} {unit}"
    return f"{b:.0f} B"


def time_line(timed: dict) -> str:
    """Where one step's seconds go, tokens/s and MFU."""
    return (
        f"  compute {timed['compute_s']:.3f} s + ZeRO exposed {timed['zero_exposed_s']:.3f} s + SAE "
        f"{timed['sae_s']:.3f} s + cache {timed['cache_s']:.3f} s + optimizer {timed['optimizer_s']:.3f} s = step "
        f"{timed['step_s']:.3f} s; "
        f"{timed['tokens_per_s']:,.0f} tokens/s ({timed['tokens_per_s_per_gpu']:,.0f} per GPU), MFU {timed['mfu']:.3f}"
    )


def weak_table(rows: list[dict], gpus: int, wl: comms.Workload) -> list[str]:
    """Markdown: step time / MFU per node count, ZeRO-3 and ZeRO++, each SAE shard group; then the bytes."""
    combos = [(z, g) for z in (False, True) for g in ("node", "world", "none")]
    head = " | ".join(f"{'ZeRO++' if z else 'ZeRO-3'} {g}" for z, g in combos)
    out = [f"| nodes | GPUs | global batch | {head} |", "|---" * (3 + len(combos)) + "|"]
    nic = [
        "| nodes | ZeRO-3 NIC | ZeRO++ NIC | SAE (node) | SAE (world) | SAE (none) |",
        "|---" * 6 + "|",
    ]
    for nodes in comms.WEAK_NODES:
        at = {(r["zeropp"], r["group"]): r for r in rows if r["nodes"] == nodes}
        cells = " | ".join(f"{_secs(at[c]['step_s'])} / {at[c]['mfu']:.2f}" for c in combos)
        out.append(f"| {nodes} | {nodes * gpus} | {wl.micro * wl.accumulation * nodes * gpus} | {cells} |")
        gb = [at[(False, "node")]["nic_bytes"], at[(True, "node")]["nic_bytes"]]
        gb += [at[(False, g)]["sae_bytes"] for g in ("node", "world", "none")]
        nic.append(f"| {nodes} | " + " | ".join(size(b) for b in gb) + " |")
    title = "Bytes per rank per step (NIC: over the rank's network link, shard group node; SAE: the encoder group)"
    return [*out, "", title, *nic]


def comm_advice(timed: dict, step: comms.StepPlan, zeropp: dict, topo: comms.Topology) -> list[str]:
    """Where communication dominates: what to change, with the projected step time (`zeropp`: with ZeRO++)."""
    tips = []
    share = timed["zero_exposed_s"] / timed["step_s"]
    if share > 0.2 and step.zero.hpz <= 1 and zeropp["step_s"] < 0.9 * timed["step_s"]:
        tips.append(
            f"ZeRO-3 communication is {100 * share:.0f}% of the step: deepspeed.config=ds_configs/zero3pp_bf16.json "
            f"(ZeRO++: hpZ keeps all but each step's first parameter gather inside the node) -> step "
            f"{zeropp['step_s']:.3g} s, MFU {zeropp['mfu']:.2f}"
        )
    if share > 0.2:
        tips.append(
            f"ZeRO-3 communication is {100 * share:.0f}% of the step, and it runs every micro-batch: a larger "
            "train.micro_batch_size (memory permitting) moves the same bytes for more tokens; under hpZ, more "
            "accumulation spreads the step's one cross-node gather"
        )
    sae_share = timed["sae_s"] / timed["step_s"]
    if sae_share > 0.05 and step.group > topo.gpus:
        tips.append(f"SAE traffic is {100 * sae_share:.0f}% of the step: sae.shard_group=node keeps it on NVLink")
    elif sae_share > 0.05:
        tips.append(f"SAE traffic is {100 * sae_share:.0f}% of the step: sae.shard_group=none (whole encoder per rank)")
    if not tips:
        tips.append(f"compute-bound: communication adds {100 * (1 - timed['compute_s'] / timed['step_s']):.0f}%")
    return tips


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fpo-ds plan", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--d-sae", type=int, help="SAE width (default: sae-lens registry, else sae.path's cfg.json)")
    p.add_argument("--sae-topk", type=int, help="k of a TopK SAE (default: sae.path's cfg.json; 0 otherwise)")
    p.add_argument("--shard-group", help="SAE encoder shard group: node, world, none or a rank count (default: recipe)")
    numbers = [  # flag, type, default, help
        ("--intra-gbps", float, comms.INTRA_GBPS, "in-node bus bandwidth per GPU, GB/s (360: NVLink 4 moves 450 per "
         "direction, NCCL ~80%%)"),
        ("--inter-gbps", float, comms.INTER_GBPS, "network bandwidth per GPU's NIC, GB/s (40: InfiniBand NDR 400 Gb/s "
         "= 50, ~80%%)"),
        ("--peak-tflops", float, comms.PEAK_TFLOPS, "dense peak per GPU (989: H100 SXM bf16)"),
        ("--mfu", float, None, "compute-only MFU (default: bench/results if comparable, else assumed)"),
        ("--prompt-tokens", int, comms.PROMPT_TOKENS, "prompt tokens per sequence (200, UltraFeedback-like)"),
        ("--response-tokens", int, comms.RESPONSE_TOKENS, "response tokens per sequence (400, UltraFeedback-like)"),
    ]  # fmt: skip
    for flag, kind, default, text in numbers:
        p.add_argument(flag, type=kind, default=default, help=text)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_intermixed_args(argv)  # key=value overrides may follow the flags
    from fpo_ds.tools.planner import shapes

    recipe = C.load(args.recipe, args.overrides)
    shape = shapes.model_shape(recipe.model.name_or_path)
    topo = comms.Topology(args.nodes, args.gpus_per_node, args.intra_gbps, args.inter_gbps)
    recipe = _resolve_auto(recipe, shape, topo, args.gpu_mem)
    group = args.shard_group or recipe.sae.shard_group
    d_sae, source = shapes.sae_width(recipe.sae, shape.hidden, args.d_sae)
    d_sae = d_sae if recipe.loss.method == "fpo" else None
    print(
        f"{recipe.model.name_or_path}: {shape.params / 1e6:,.1f}M params, {shape.layers} layers, hidden "
        f"{shape.hidden}, vocab {shape.vocab}; {args.nodes} x {args.gpus_per_node} GPUs; {recipe.deepspeed.config}"
    )
    fits = _print_memory(recipe, shape, topo, d_sae, group, args.gpu_mem)
    if recipe.loss.method == "fpo":
        size = comms.shard_group_size(group, topo)
        print(f"SAE: {d_sae or 'unknown (pass --d-sae)'} features ({source}); shard group {group} = {size} ranks")
    mfu, why = (args.mfu, "--mfu") if args.mfu else comms.default_mfu(shape.params)
    kw = {"tokens": (args.prompt_tokens, args.response_tokens), "sae_k": _topk(args, recipe, shapes)}
    z = comms.zero_settings(recipe.deepspeed.config)
    step = comms.plan_step(recipe, shape, topo, d_sae, group, z, **kw)
    timed = _print_step(recipe, shape, topo, step, d_sae, mfu, why, args.peak_tflops)
    _print_weak(recipe, shape, topo, d_sae, step.workload, mfu, args.peak_tflops, kw)
    pp = comms.plan_step(recipe, shape, topo, d_sae, group, z.zeropp(topo.gpus, True), **kw)
    zeropp = comms.step_time(recipe, shape, topo, pp, d_sae, mfu, args.peak_tflops)
    for line in comm_advice(timed, step, zeropp, topo):
        print(f"- {line}")
    if not fits:  # scripts that ask "does it fit?" read the exit status
        raise SystemExit(EXIT_DOES_NOT_FIT)


def _resolve_auto(recipe: C.Recipe, shape, topo: comms.Topology, gpu_mem: float) -> C.Recipe:
    """deepspeed.config=auto: say what it picks on these GPUs; the plan then models the ZeRO-3 bf16 JSON."""
    import dataclasses

    from fpo_ds import ds_config, zero_auto

    if recipe.deepspeed.config != ds_config.AUTO:
        return recipe
    facts = zero_auto.ModelFacts(shape.params, shape.hidden, shape.layers, shape.vocab)
    choice = zero_auto.choose(recipe, facts, topo.nodes * topo.gpus, int(gpu_mem * GIB), bf16=True)
    print(choice.reason)
    zero3 = "ds_configs/zero3_bf16.json"
    if choice.systems["zero_optimization"]["stage"] == 2:
        print(f"(the plan models ZeRO-3 runs: below is {zero3}, what auto would pick on smaller GPUs)")
    return dataclasses.replace(recipe, deepspeed=dataclasses.replace(recipe.deepspeed, config=zero3))


def _print_weak(recipe, shape, topo: comms.Topology, d_sae, wl: comms.Workload, mfu: float, peak: float, kw: dict):
    rows = comms.weak_scaling(recipe, shape, topo, d_sae, wl, mfu, peak, **kw)
    print(
        f"\nWeak scaling: micro {wl.micro} x accumulation {wl.accumulation} per rank fixed, so the global batch "
        f"grows with the world; step seconds / MFU, {recipe.deepspeed.config} without and with ZeRO++ "
        "(hpZ over the node, qwZ, qgZ), per SAE shard group"
    )
    print("\n".join(weak_table(rows, topo.gpus, wl)))


def _topk(args, recipe, shapes) -> int:
    return args.sae_topk if args.sae_topk is not None else shapes.sae_topk(recipe.sae)


def _print_memory(recipe, shape, topo: comms.Topology, d_sae, group, gpu_mem: float) -> bool:
    """Print the memory table and advice; True when the recipe fits."""
    items = estimate(recipe, shape._asdict(), topo.nodes, topo.gpus, d_sae, group)
    print("Memory per GPU:")
    for k, v in items.items():
        size = f"{v / GIB:8.2f} GiB {v / 2**20:12,.1f} MiB" if v >= 2**20 else f"{v / 2**10:8.1f} KiB"  # never "0.00"
        print(f"  {k:24s} {size}{'   (host memory, not GPU)' if k.startswith('host_') else ''}")
    lines = advice(items, recipe, gpu_mem * GIB)
    for line in lines:
        print(f"  {line}")
    return not lines[0].startswith("does NOT fit")


def _print_step(
    recipe, shape, topo: comms.Topology, step: comms.StepPlan, d_sae, mfu: float, why: str, peak: float
) -> dict:
    wl = step.workload
    print(
        f"\nBatch: micro {wl.micro} pair(s) x {topo.world} ranks x accumulation {wl.accumulation} = global "
        f"{wl.micro * topo.world * wl.accumulation} pairs per step; {wl.rows} sequences per micro-batch of "
        f"{wl.seq_tokens} tokens ({wl.response_tokens} response; --prompt-tokens / --response-tokens)"
    )
    if step.note:
        print(f"  note: {step.note}")
    print("Communication per optimizer step and rank (bytes received; NCCL ring / all-to-all on the group's links):")
    print("\n".join(comm_table(step, topo)))
    lg = step.logged
    print(
        f"  DeepSpeed's comms logger, per step (its msg_size: input bytes): all_gather {lg.allgather:,.0f} B, "
        f"reduce_scatter {lg.reduce_scatter:,.0f} B, all_to_all {lg.all_to_all:,.0f} B"
    )
    timed = comms.step_time(recipe, shape, topo, step, d_sae, mfu, peak)
    print(
        f"Time per step: {peak:.0f} TFLOPS peak, compute MFU {mfu:.3f} ({why}); in-node {topo.intra_gbps:.0f} GB/s, "
        f"network {topo.inter_gbps:.0f} GB/s per GPU"
    )
    print(time_line(timed))
    return timed


if __name__ == "__main__":
    main()
