"""How long one optimizer step takes, and how that scales: strong scaling at the recipe's batch, weak beyond.

A step is A micro-batches of compute (fpo_ds/tools/planner/compute.py) plus the time of the
collectives that do not hide under it (bytes: comms.py, seconds per collective: links.py):
  overlap (NCCL)   ZeRO-3 prefetches parameters on a side stream, so a pass waits for its first
                   gather, and for whatever its gathers (in backward with the reduce-scatter, which
                   shares the links) take beyond its compute; the last reduce-scatter bucket trails
                   the backward.
  gathers only     (gloo on CPU ranks, calibrated): prefetched gathers hide as above, the gradient
                   reduction waits in full.
  no overlap       every collective waits.
The SAE group's collectives sit on the critical path (the loss needs them). Per step: the
persistent / ZeRO-2 gathers and the per-step syncs, the optimizer step (Adam streams ADAM_BYTES
per partitioned parameter through HBM; not modelled under optimizer offload), the cache read and
ZeRO++'s quantisation kernels (compute.quant_seconds, an estimate).
"""

from __future__ import annotations

from fpo_ds.tools.planner import comms, compute
from fpo_ds.tools.planner.links import Topology, Traffic, link_bytes, seconds

ADAM_BYTES = 30  # per partitioned parameter: read fp32 master, m, v, grad (16) + write them (12) + the 16-bit copy (2)
UF_PAIRS = 61_135  # HuggingFaceH4/ultrafeedback_binarized train_prefs: the recipes' data set
DATASET_PAIRS = {"HuggingFaceH4/ultrafeedback_binarized": UF_PAIRS}
WEAK_NODES = (1, 2, 8, 16, 64)


def step_time(
    recipe, shape, topo: Topology, step: comms.StepPlan, d_sae, mfu: float, peak: float, micro_s: float | None = None
) -> dict:
    """Seconds per optimizer step and what they go to, tokens/s and MFU.

    `micro_s` replaces the compute of one micro-batch by a measured figure (the emulated-cluster test).
    """
    wl, a = step.workload, step.workload.accumulation
    live = recipe.loss.ref_kind == "live"
    flops = compute.step_flops(recipe, shape, wl.rows, wl.seq_tokens, wl.response_tokens, d_sae, live)
    c = micro_s if micro_s is not None else compute.compute_seconds(flops, mfu, peak)
    fwd = c / (3 + recipe.model.gradient_checkpointing)
    zero = sae = 0.0
    for m in range(a):
        by = _phases([t for t in step.traffic if t.micro == m], topo)
        if topo.overlap and topo.overlap_reduce:
            zero += by["fwd"][1] + max(0.0, by["fwd"][0] - by["fwd"][1] - fwd)
            zero += by["bwd"][1] + max(0.0, by["bwd"][0] - by["bwd"][1] + by["rs"][0] - (c - fwd)) + by["rs"][1]
        elif topo.overlap:  # the reduction blocks: only the gathers hide
            zero += by["fwd"][1] + max(0.0, by["fwd"][0] - by["fwd"][1] - fwd)
            zero += by["bwd"][1] + max(0.0, by["bwd"][0] - by["bwd"][1] - (c - fwd)) + by["rs"][0]
        else:
            zero += by["fwd"][0] + by["bwd"][0] + by["rs"][0]
        sae += by["sae"][0]
    once = [t for t in step.traffic if t.micro < 0 and t.kind != "host"]
    syncs = sum(seconds(t, topo) for t in once if t.name in _SYNC_NAMES)
    zero += sum(seconds(t, topo) for t in once if t.name not in _SYNC_NAMES)
    cache = sum(seconds(t, topo) for t in step.traffic if t.kind == "host")
    partition = shape.params / topo.world  # ZeRO-2 and ZeRO-3 both partition the optimizer states
    optimizer = 0.0 if step.zero.offload_optimizer else ADAM_BYTES * partition / (compute.HBM_GBPS * 1e9)
    quant = compute.quant_seconds(*_quantised(step)) if (step.zero.qwz or step.zero.qgz) else 0.0
    total = a * c + zero + sae + syncs + cache + optimizer + quant
    tokens = a * wl.rows * wl.seq_tokens
    return {
        "compute_s": a * c,
        "zero_exposed_s": zero,
        "sae_s": sae,
        "sync_s": syncs,
        "cache_s": cache,
        "optimizer_s": optimizer,
        "quant_s": quant,
        "step_s": total,
        "tokens_per_s": tokens * topo.world / total,
        "tokens_per_s_per_gpu": tokens / total,
        "mfu": a * flops / (total * peak * 1e12),
    }


_SYNC_NAMES = ("metrics_all_reduce", "stop_check", "grad_norm_all_reduce", "overflow_check")


def _quantised(step: comms.StepPlan) -> tuple[float, float]:
    """Elements ZeRO++ quantises / dequantises per step on one rank: (sent, received).

    qwZ gathers move 1 byte per element: a rank quantises its piece and dequantises the group's. qgZ's
    all-to-alls move int4 (2 elements per byte) both ways.
    """
    sent = got = 0.0
    for t in step.traffic:
        if t.name.startswith("zero_allgather") and step.zero.qwz and t.link.group > 1:
            got += t.received
            sent += t.received / (t.link.group - 1)
        elif t.name == "zero_reduce_scatter" and t.kind == "all_to_all":
            got += 2 * t.received
            sent += 2 * t.received
    return sent, got


def _phases(traffic: list[Traffic], topo: Topology) -> dict[str, tuple[float, float]]:
    """One micro-batch's seconds by phase: (all of it, the first call); "rs": (all of it, its last bucket)."""
    out = {k: [0.0, 0.0] for k in ("fwd", "bwd", "sae", "rs")}
    for t in traffic:
        s = seconds(t, topo)
        key = "rs" if t.name in ("zero_reduce_scatter", "zero_allreduce") else t.phase
        out[key][0] += s
        out[key][1] = max(out[key][1], s / max(t.calls, 1))
    return {k: (v[0], v[1]) for k, v in out.items()}


# ----------------------------------------------------------------------------- scaling tables


def dataset_pairs(recipe) -> int | None:
    """Training pairs of the recipe's data set when known offline (the recipes' hub data set)."""
    return DATASET_PAIRS.get(recipe.data.path)


def strong_scaling(recipe, shape, topo: Topology, d_sae, mfus: list[float], peak: float, global_batch: int, **kw):
    """Fixed global batch: step time per node count from 1 node up to the data-parallel limit.

    Rows: nodes, GPUs, accumulation, step seconds per MFU in `mfus`. Node counts double from 1 while
    micro x GPUs divides the global batch.
    """
    micro = recipe.train.micro_batch_size
    limit = comms.data_parallel_limit(global_batch, micro)
    rows, nodes = [], 1
    while nodes * topo.gpus <= limit:
        t = topo._replace(nodes=nodes)
        if global_batch % (micro * t.world) == 0:
            step = comms.plan_step(recipe, shape, t, d_sae, global_batch=global_batch, **kw)
            secs = [step_time(recipe, shape, t, step, d_sae, m, peak)["step_s"] for m in mfus]
            rows.append({"nodes": nodes, "gpus": t.world, "accumulation": step.workload.accumulation, "step_s": secs})
        nodes *= 2
    return rows


def weak_scaling(recipe, shape, topo: Topology, d_sae, wl: comms.Workload, mfu: float, peak: float, **kw) -> list[dict]:
    """Step time and MFU on 1-64 nodes at fixed micro-batch and accumulation: the global batch grows.

    Each node count runs the recipe's ZeRO settings without and with ZeRO++ (hpZ over the node, qwZ,
    qgZ), for each SAE shard group.
    """
    base = comms.zero_settings(recipe.deepspeed.config)
    rows = []
    for nodes in WEAK_NODES:
        t = topo._replace(nodes=nodes)
        for zpp in (False, True):
            for group in ("node", "world", "none"):
                step = comms.plan_step(recipe, shape, t, d_sae, group, base.zeropp(topo.gpus, zpp), wl=wl, **kw)
                sae = sum(x.received for x in step.traffic if x.name.startswith("sae_"))
                nic = sum(link_bytes(x)[1] for x in step.traffic)
                timed = step_time(recipe, shape, t, step, d_sae, mfu, peak)
                rows.append(
                    {
                        "nodes": nodes,
                        "zeropp": zpp,
                        "group": group,
                        "global_batch": wl.micro * wl.accumulation * t.world,
                        "sae_bytes": sae,
                        "nic_bytes": nic,
                        **timed,
                    }
                )
    return rows
