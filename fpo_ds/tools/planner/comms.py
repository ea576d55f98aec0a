"""Communication and time model of one optimizer step, for `fpo-ds plan --nodes N --gpus-per-node G`.

Every byte count is what ONE rank RECEIVES in one optimizer step (A micro-batches), the convention
of the sharded encoder's own counter. A ring collective over g ranks that leaves every rank with
an M-byte result makes each rank receive (g-1)/g x M; an all-to-all of S bytes per rank, (g-1)/g x S.

Collective classes (DeepSpeed 0.19.8, read from runtime/zero/{stage3,partition_parameters,
partitioned_param_coordinator}.py and runtime/comm/coalesced_collectives.py):

  zero_allgather_fwd / _bwd  ZeRO-3 fetches each module's parameters before its forward, its
      activation-checkpointing recompute (a forward run inside backward: it fetches again) and its
      backward. A parameter stays gathered while it is reused within stage3_max_reuse_distance
      elements of the module trace or was marked by the prefetcher, so which fetches move bytes is
      simulated on the model's real call tree (fpo_ds/tools/planner/zero3_trace.py). Parameters of at most
      stage3_param_persistence_threshold elements are never partitioned away and never fetched;
      they are all-gathered once per step, after the optimizer step (zero_allgather_persistent).
      Each rank holds ceil(numel / W) elements of every parameter (DeepSpeed pads to a multiple
      of W), so a fetch of parameter p receives (W-1) x ceil(numel_p / W) elements.
  zero_reduce_scatter  every micro-batch (ZeRO-3 keeps no full gradients): (W-1) x ceil(numel/W)
      elements of every trainable parameter, in buckets of reduce_bucket_size elements.
  ZeRO++ (Wang et al. 2023, arXiv 2306.10209, message sizes as DeepSpeed implements them):
    qwZ  zero_quantized_weights: every parameter all-gather moves int8 (1 byte/element) plus one
         fp32 scale per QUANT_GROUP elements, instead of 2 (bf16) or 4 (fp32) bytes. DeepSpeed
         quantizes the forward, recompute and backward gathers alike.
    hpZ  zero_hpz_partition_size = h: the first gather of a parameter after an optimizer step runs
         over all W ranks; its release leaves a secondary copy split over h ranks (one node), and
         every later gather in that step (recompute, backward, the next micro-batches) runs
         inside the node: (h-1) x pad(numel, W)/h elements. A frozen live reference never
         refreshes its copy: all its gathers stay in the node.
    qgZ  zero_quantized_gradients (more than one node): each 2-D gradient whose numel divides
         by 2W goes as int4 through an all-to-all inside the node (each rank receives
         (g-1)/g x numel/2 bytes), is reduced there, requantised, and crosses nodes in a second
         all-to-all between the ranks of the same local index ((n-1)/n x numel/(2g) bytes), plus
         fp32 scales; other gradients take the reduce-scatter.
  sae_gather_alltoall  the sharded SAE encoder's group (sae_bytes_per_call), forward and backward.
  cache_read  host bytes of the offline reference read per step (copied host -> device).

Time: each collective on its links. A ring over g ranks with r of them per node spends
(g-1)/g x M / busbw on the in-node links and, when it spans nodes, (g-1)/g x M / r on each rank's
network link (NCCL runs one ring per NIC, so the node's r NICs carry the ring in parallel); the
slower of the two sets the time. An all-to-all sends each off-node piece over the rank's own NIC.
Latency per call follows NCCL's ring tuning model (src/graph/tuning.cc): base + in-node steps x
NVLink hop + cross-node steps x network hop, for the Simple, LL128 and LL protocols, the fastest.
Overlap: ZeRO-3 prefetches parameters on a side stream, so gathers hide under compute except the
first fetch of each pass; the reduce-scatter shares the backward's links and only its last bucket
trails the backward; the SAE collectives sit on the critical path (the loss needs them) and the
persistent gather and optimizer step follow the backward.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import NamedTuple

from fpo_ds.ds_config import path as ds_path
from fpo_ds.tools.planner import zero3_trace

GB = 1e9
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16 (no sparsity), the bench's --peak-tflops
INTRA_GBPS = 360.0  # NVLink 4: 450 GB/s per direction per GPU; NCCL reaches ~80% of it as bus bandwidth
INTER_GBPS = 40.0  # InfiniBand NDR 400 Gb/s = 50 GB/s per GPU's NIC; ~80% usable as bus bandwidth
HBM_GBPS = 3350.0  # H100 SXM HBM3: the optimizer step streams the rank's partition through it
PCIE_GBPS = 25.0  # host -> device copy of the cache rows (PCIe Gen5 x16 is 64 GB/s raw; pageable memory)
# NCCL's ring tuning model (src/graph/tuning.cc, Ring row of its tables), per protocol: latency in
# microseconds (base, per NVLink step, per network step) and the share of the bus bandwidth it
# reaches. NCCL picks, per call, the protocol with the least latency + bytes / bandwidth.
PROTOCOLS = {"simple": (8.4, 3.4, 9.6, 1.0), "ll128": (10.0, 1.9, 4.0, 0.92), "ll": (3.6, 0.47, 2.7, 0.25)}
QUANT_GROUP = 8000  # DeepSpeed's CUDAQuantizer.target_group_size: elements per fp32 scale (qwZ)
ADAM_BYTES = 30  # per partitioned parameter: read fp32 master, m, v, grad (16) + write them (12) + the 16-bit copy (2)
ASSUMED_MFU = 0.35  # compute-only MFU for 2B-9B models at ~1k-token sequences, activation checkpointing
RESPONSE_TOKENS = 400  # per sequence, UltraFeedback-like (the worked example)
PROMPT_TOKENS = 200  # per sequence, UltraFeedback-like; capped by data.max_prompt_length
BENCH_RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results"


class Topology(NamedTuple):
    """Nodes x GPUs per node and the bus bandwidths (GB/s per GPU) of their links."""

    nodes: int
    gpus: int
    intra_gbps: float = INTRA_GBPS
    inter_gbps: float = INTER_GBPS

    @property
    def world(self) -> int:
        return self.nodes * self.gpus


class Workload(NamedTuple):
    """One rank's share of a step: A micro-batches of `micro` pairs (2 x micro sequences each)."""

    micro: int
    accumulation: int
    seq_tokens: int  # prompt + response tokens per sequence
    response_tokens: int  # response tokens per sequence (what the SAE encodes)

    @property
    def rows(self) -> int:
        return 2 * self.micro


class ZeroSettings(NamedTuple):
    """The knobs of a DeepSpeed JSON that change what ZeRO-3 moves (DeepSpeed's defaults otherwise)."""

    item: int  # bytes per parameter / gradient element: 2 (bf16, fp16) or 4 (fp32)
    hpz: int = 1
    qwz: bool = False
    qgz: bool = False
    persistence: int = 100_000
    model_persistence: int = 2**63 - 1
    prefetch_bucket: int = 50_000_000
    max_live: int = 1_000_000_000
    max_reuse: int = 1_000_000_000
    reduce_bucket: int = 500_000_000
    offload_optimizer: bool = False
    offload_param: bool = False

    def zeropp(self, gpus: int, on: bool) -> ZeroSettings:
        """These settings with ZeRO++ (hpZ over one node, qwZ, qgZ) on or off."""
        return self._replace(hpz=gpus if on else 1, qwz=on, qgz=on)


class Link(NamedTuple):
    """A group of consecutive ranks and how it sits on the nodes (blocks of `per_node` ranks)."""

    group: int
    per_node: int

    @property
    def nodes(self) -> int:
        return -(-self.group // self.per_node)


class Traffic(NamedTuple):
    """One collective class in one micro-batch (or once per step): bytes one rank receives, calls, link."""

    name: str
    received: float
    calls: float
    link: Link
    kind: str  # "ring" (all-gather / reduce-scatter), "all_to_all" or "host"
    phase: str  # "fwd" / "bwd": overlaps that pass's compute; "sae", "step": on the critical path
    micro: int  # the micro-batch it belongs to; -1: once per step


# ----------------------------------------------------------------------------- settings and workload


def zero_settings(ds_config: str) -> ZeroSettings:
    """The ZeRO knobs of the recipe's DeepSpeed JSON; the planner models ZeRO-3 only."""
    path = ds_path(ds_config)
    cfg = json.loads(path.read_text())
    zero = cfg.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ValueError(
            f"deepspeed.config: {path} is ZeRO stage {zero.get('stage')}; fpo-ds plan models ZeRO-3 runs "
            "(pick ds_configs/zero3_*.json)"
        )
    on_host = lambda key: zero.get(key, {}).get("device", "none") in ("cpu", "nvme")  # noqa: E731
    half = cfg.get("bf16", {}).get("enabled") or cfg.get("fp16", {}).get("enabled")
    d = ZeroSettings(item=2)  # DeepSpeed's defaults for the keys the JSON leaves out
    return ZeroSettings(
        item=2 if half else 4,
        hpz=zero.get("zero_hpz_partition_size", d.hpz),
        qwz=zero.get("zero_quantized_weights", d.qwz),
        qgz=zero.get("zero_quantized_gradients", d.qgz),
        persistence=int(zero.get("stage3_param_persistence_threshold", d.persistence)),
        model_persistence=int(zero.get("stage3_model_persistence_threshold", d.model_persistence)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", d.prefetch_bucket)),
        max_live=int(zero.get("stage3_max_live_parameters", d.max_live)),
        max_reuse=int(zero.get("stage3_max_reuse_distance", d.max_reuse)),
        reduce_bucket=int(zero.get("reduce_bucket_size", d.reduce_bucket)),
        offload_optimizer=on_host("offload_optimizer"),
        offload_param=on_host("offload_param"),
    )


def workload(recipe, topo: Topology, prompt_tokens: int, response_tokens: int) -> tuple[Workload, str]:
    """Micro-batch, accumulation and tokens per sequence at this world, with a note on the batch.

    The recipe's global batch is kept when it divides over the world; otherwise the accumulation
    it gives on one node is kept (weak scaling: the global batch grows with the world).
    """
    t, d = recipe.train, recipe.data
    prompt = min(prompt_tokens, d.max_prompt_length)
    response = max(1, min(response_tokens, d.max_length - prompt))
    per_step = t.micro_batch_size * topo.world
    if t.global_batch_size % per_step == 0:
        acc, note = t.global_batch_size // per_step, ""
    else:
        acc = max(1, t.global_batch_size // (t.micro_batch_size * topo.gpus))
        note = (
            f"train.global_batch_size={t.global_batch_size} does not divide over micro {t.micro_batch_size} x "
            f"{topo.world} ranks; planned with the accumulation one node of {topo.gpus} gives ({acc}): global "
            f"batch {t.micro_batch_size * topo.world * acc} (pass train.global_batch_size=... to run it)"
        )
    return Workload(t.micro_batch_size, acc, prompt + response, response), note


def reference_kind(loss) -> str:
    """What each micro-batch's reference is: 'live' (a frozen engine), 'offline' (the cache) or 'none'."""
    kinds = {"fpo": "offline", "sft": "none", "simpo": "none", "tdpo1": "live", "tdpo2": "live"}
    return kinds.get(loss.method, loss.reference)


def shard_group_size(spec: str | int, topo: Topology) -> int:
    """`sae.shard_group` -> ranks per group: node = GPUs per node, world, none = 1, or an integer."""
    named = {"node": topo.gpus, "world": topo.world, "none": 1}
    size = named.get(spec) or (int(spec) if str(spec).isdigit() else 0)
    if size < 1 or topo.world % size:
        raise ValueError(
            f"sae.shard_group: {spec!r} does not give groups that divide the world of {topo.world} ranks; "
            "use node, world, none or a divisor of the world"
        )
    return size


# ----------------------------------------------------------------------------- the SAE encoder's group


def sae_item(model_item: int, rows: int) -> int:
    """Bytes per gathered hidden-state value: the model's 16-bit type, unless row ids would not be exact.

    The gather carries each token's row id in an extra column of the hidden states' type; bf16
    (the recipes' 16-bit type) holds integers exactly up to 256 (8 significant bits), so more rows
    go as fp32.
    """
    return 4 if model_item == 4 or rows > 256 else model_item


def sae_bytes_per_call(group: int, n_max: int, d_in: int, rows: int, d_sae: int, item: int, topk: int = 0) -> int:
    """Bytes one rank receives in one forward call of the sharded encoder over a group of G ranks.

    token gather   (G-1) x n_max x (d_in+1) x item   the group's response tokens (+ a row-id column)
    all-to-all     (G-1) x rows x ceil(d_sae/G) x 4  my rows' pooled fp32 feature slices, from each peer
    TopK only      (G-1) x G x n_max x topk x 4      every gathered token's local top-k values
    n_max is the group's largest response-token count in the call (padding up to it is sent too).
    The backward moves the gather and the all-to-all again (not the TopK gather: the cut-off has no
    gradient). G = 1 (shard_group none) keeps the whole encoder on the rank: nothing moves.
    """
    from fpo_ds.sae import comm_bytes_per_call  # the encoder's own counter: one formula for both

    return comm_bytes_per_call(group, n_max, d_in, rows, -(-d_sae // group), item, 4, topk)


def sae_traffic(wl: Workload, group: int, topo: Topology, d_in: int, d_sae: int, item: int, topk: int) -> list[Traffic]:
    """The encoder group's collectives; one forward's parts sum to sae_bytes_per_call.

    Per micro-batch: the token gather (a ring) and the feature all-to-all, each again in backward
    (the gather's backward sends every piece home: an all-to-all), and the TopK gather (forward).
    """
    if group == 1:
        return []
    n_max = wl.rows * wl.response_tokens  # the busiest rank's response tokens in one micro-batch
    gather = (group - 1) * n_max * (d_in + 1) * sae_item(item, wl.rows)
    a2a = (group - 1) * wl.rows * -(-d_sae // group) * 4
    topk_bytes = (group - 1) * group * n_max * topk * 4
    link = Link(group, min(group, topo.gpus))
    out = []
    for m in range(wl.accumulation):
        out += [
            Traffic("sae_token_gather", gather, 1, link, "ring", "sae", m),
            Traffic("sae_token_gather_grad", gather, 1, link, "all_to_all", "sae", m),
            Traffic("sae_feature_all_to_all", 2 * a2a, 2, link, "all_to_all", "sae", m),
        ]
        out += [Traffic("sae_topk_gather", topk_bytes, 1, link, "ring", "sae", m)] if topk else []
    return out


def cache_traffic(wl: Workload, recipe, k_cache: int) -> list[Traffic]:
    """Offline reference rows read per step (fpo_ds/cache.py's columns, per pair).

    example_id int64 (8) + sum_logps f32 x2 (8) + n_tokens int32 x2 (8), and with SAE features
    feat_idx int32 + feat_val f32 for k_cache entries x2 (16 k) + feat_dropped_max f32 x2 (8).
    """
    if reference_kind(recipe.loss) != "offline":
        return []
    per_pair = 24 + (16 * k_cache + 8 if recipe.loss.method == "fpo" else 0)
    pairs = wl.micro * wl.accumulation
    return [Traffic("cache_read", pairs * per_pair, wl.accumulation, Link(1, 1), "host", "step", -1)]


# ----------------------------------------------------------------------------- ZeRO-3 traffic


class Logged(NamedTuple):
    """Per-step bytes in DeepSpeed's comms-logger convention (its msg_size is a call's INPUT tensor).

    all_gather_into_tensor logs one rank's partition, not the gathered result; reduce_scatter_tensor
    logs the whole padded input; all_to_all_single (qgZ) logs its input.
    """

    allgather: float = 0.0
    reduce_scatter: float = 0.0
    all_to_all: float = 0.0


def zero_traffic(shape, z: ZeroSettings, topo: Topology, wl: Workload, checkpointing: bool, reference: str):
    """ZeRO-3's collectives of one step and their comms-logger totals: (traffic, Logged).

    The policy's gathers per micro-batch come from zero3_trace; a live reference (frozen engine,
    forward only) adds its own. hpZ's first-gather rule needs the step's order: the set `fresh`
    holds the parameters not gathered since the optimizer step.
    """
    persist = zero3_trace.persistent(shape.numels, z.persistence, z.model_persistence)
    if topo.world == 1:  # nothing is partitioned: no gathers; the reduce-scatter still runs (and is logged)
        return [], Logged(reduce_scatter=wl.accumulation * z.item * sum(shape.numels))
    knobs = (checkpointing, z.prefetch_bucket, z.max_live, z.max_reuse)
    policy = zero3_trace.fetch_calls(shape.forward, shape.numels, persist, knobs, True)
    ref = zero3_trace.fetch_calls(shape.forward, shape.numels, persist, knobs, False) if reference == "live" else ()
    fresh = {p for p, kept in enumerate(persist) if not kept}
    out, logged = [], 0.0
    for m in range(min(wl.accumulation, 2)):  # every pass gathers every parameter: micro-batches 1.. are alike
        for phase, ps in policy:
            logged += gather_call(out, f"zero_allgather_{phase}", phase, m, ps, fresh, shape.numels, z, topo)
        for _, ps in ref:  # its hpZ copy never expires (no optimizer step refreshes it): fresh is empty
            logged += gather_call(out, "zero_allgather_reference", "fwd", m, ps, set(), shape.numels, z, topo)
    again = [t for t in out if t.micro == 1]
    out += [t._replace(micro=m) for m in range(2, wl.accumulation) for t in again]
    logged += (wl.accumulation - 2) * sum(t.received / (t.link.group - 1) for t in again) if again else 0.0
    kept = [p for p, k in enumerate(persist) if k]
    if kept:  # after the optimizer step: one all_gather_into_tensor per persistent parameter
        elems = sum(-(-shape.numels[p] // topo.world) for p in kept)
        link = Link(topo.world, min(topo.world, topo.gpus))
        out.append(
            Traffic("zero_allgather_persistent", (topo.world - 1) * elems * z.item, len(kept), link, "ring", "step", -1)
        )
        logged += elems * z.item
    grads, glog = reduce_traffic(shape, z, topo, wl)
    return merge(out + grads), glog._replace(allgather=logged)


def gather_call(out: list, name: str, phase: str, micro: int, ps, fresh: set, numels, z: ZeroSettings, topo: Topology):
    """Append one all_gather_coalesced call's traffic to `out`; returns the bytes the comms logger records.

    With hpZ, parameters gathered before in this step fetch their secondary copy inside the node
    (pad(numel, W)/h elements per rank); the rest gather their primary ceil(numel/W) elements over
    all W ranks. qwZ sends int8 plus one fp32 scale per QUANT_GROUP elements, in a second call.
    """
    W, item = topo.world, 1 if z.qwz else z.item
    h = min(z.hpz, W)  # DeepSpeed clips the secondary group to the world
    first = [p for p in ps if p in fresh or h <= 1]
    again = [p for p in ps if p not in first]
    fresh.difference_update(ps)
    logged = 0.0
    for params, group in ((first, W), (again, h)):
        if params:
            elems = sum(-(-numels[p] // W) * (W // group) for p in params)
            scales = 4 * -(-elems // QUANT_GROUP) if z.qwz else 0
            link = Link(group, min(group, topo.gpus))
            out.append(
                Traffic(name, (group - 1) * (elems * item + scales), 1 + bool(scales), link, "ring", phase, micro)
            )
            logged += elems * item + scales
    return logged


def reduce_traffic(shape, z: ZeroSettings, topo: Topology, wl: Workload) -> tuple[list[Traffic], Logged]:
    """The gradient reduction of every micro-batch: reduce-scatter in buckets, or qgZ's two all-to-alls.

    reduce_scatter_coalesced pads each gradient to ceil(numel/W) x W elements and sends one call
    per bucket of reduce_bucket_size elements (one per gradient on qgZ's fallback path). qgZ
    sends int4 (numel/2 bytes) + fp32 scales (max(rows, cols, W) of them) to the node, then 1/g
    of that to the same local rank of every other node. (qgZ's sizes are read from DeepSpeed's
    code, not measured: its kernels need CUDA.)
    """
    W, g, n, a = topo.world, topo.gpus, topo.nodes, wl.accumulation
    qgz = z.qgz and n > 1
    quant = [qgz and len(s) >= 2 and math.prod(s) % (2 * W) == 0 for s in shape.dims]
    plain = [p for p, q in enumerate(quant) if not q]
    padded = sum(-(-shape.numels[p] // W) * W for p in plain)
    calls = len(plain) if qgz else _buckets([shape.numels[p] for p in reversed(plain)], z.reduce_bucket)
    sizes = [(math.prod(s), max(s[0], s[1], W)) for s, q in zip(shape.dims, quant) if q]
    intra = sum(e / 2 + 4 * groups for e, groups in sizes)
    inter = sum(e / (2 * g) + 4 * groups / g for e, groups in sizes)
    out = []
    for m in range(a):
        out.append(
            Traffic("zero_reduce_scatter", (W - 1) / W * padded * z.item, calls, Link(W, min(W, g)), "ring", "bwd", m)
        )
        if sizes:
            out.append(
                Traffic("zero_reduce_scatter", (g - 1) / g * intra, 2 * len(sizes), Link(g, g), "all_to_all", "bwd", m)
            )
            out.append(
                Traffic("zero_reduce_scatter", (n - 1) / n * inter, 2 * len(sizes), Link(n, 1), "all_to_all", "bwd", m)
            )
    return out, Logged(reduce_scatter=a * padded * z.item, all_to_all=a * (intra + inter))


def _buckets(numels: list[int], size: int) -> int:
    """Reduce-scatter calls: gradients fill a bucket until the next would overflow it."""
    count, filled = 0, 0
    for n in numels:
        if filled and filled + n > size:
            count, filled = count + 1, 0
        filled += n
    return count + bool(filled)


def merge(traffic: list[Traffic]) -> list[Traffic]:
    """Sum the records of one class on one link in one micro-batch (order kept)."""
    out: dict[tuple, Traffic] = {}
    for t in traffic:
        key = (t.name, t.link, t.kind, t.phase, t.micro)
        if key in out:
            t = t._replace(received=out[key].received + t.received, calls=out[key].calls + t.calls)
        out[key] = t
    return list(out.values())


# ----------------------------------------------------------------------------- one step, all of it


class StepPlan(NamedTuple):
    """Everything one rank moves in one optimizer step."""

    workload: Workload
    note: str  # how the batch was fitted to the world ("" if the recipe's own)
    group: int  # the SAE shard group's size
    zero: ZeroSettings
    traffic: list[Traffic]
    logged: Logged


def plan_step(
    recipe,
    shape,
    topo: Topology,
    d_sae: int | None = None,
    shard_group: str | int | None = None,
    zero: ZeroSettings | None = None,
    tokens: tuple[int, int] = (PROMPT_TOKENS, RESPONSE_TOKENS),
    sae_k: int = 0,
    wl: Workload | None = None,
) -> StepPlan:
    """All collectives of one optimizer step for the recipe on this topology.

    `zero` defaults to the recipe's DeepSpeed JSON; `tokens` is (prompt, response) tokens per
    sequence; `sae_k` the k of a TopK SAE (0 otherwise); `wl` fixes micro-batch and accumulation
    (the weak-scaling table), else they come from the recipe at this world.
    """
    z = zero or zero_settings(recipe.deepspeed.config)
    note = ""
    if wl is None:
        wl, note = workload(recipe, topo, *tokens)
    group = shard_group_size(recipe.sae.shard_group if shard_group is None else shard_group, topo)
    ckpt = recipe.model.gradient_checkpointing
    traffic, logged = zero_traffic(shape, z, topo, wl, ckpt, reference_kind(recipe.loss))
    if recipe.loss.method == "fpo" and d_sae:
        traffic += sae_traffic(wl, group, topo, shape.hidden, d_sae, z.item, sae_k)
    traffic += cache_traffic(wl, recipe, recipe.cache.k_cache or 4 * recipe.sae.k)
    return StepPlan(wl, note, group, z, traffic, logged)


def link_bytes(t: Traffic) -> tuple[float, float]:
    """(bytes over the rank's in-node links, bytes over its network link) of a traffic record.

    A ring's bytes all pass the in-node links when the group has more than one rank per node;
    across nodes NCCL runs one ring per NIC, so each rank's NIC carries 1/r of them (r ranks of
    the group per node). An all-to-all sends each peer's piece once: off-node pieces use the NIC.
    """
    link = t.link
    if t.kind == "host" or link.group <= 1:
        return 0.0, 0.0
    if t.kind == "ring":
        return (t.received if link.per_node > 1 else 0.0), (t.received / link.per_node if link.nodes > 1 else 0.0)
    piece = t.received / (link.group - 1)
    return piece * (link.per_node - 1), piece * (link.group - link.per_node)


def collective_bytes(recipe, shape, topo: Topology, d_sae: int | None = None, **kw) -> dict[str, float]:
    """Bytes one rank receives per optimizer step, per collective class (plan_step's keyword arguments).

    Keys: zero_allgather_fwd, zero_allgather_bwd (recompute included), zero_allgather_persistent,
    zero_allgather_reference (live reference only), zero_reduce_scatter, sae_gather_alltoall (the
    encoder group, forward and backward), cache_read (host); intra_node_bytes / inter_node_bytes
    (over the rank's in-node links / its NIC); and the comms logger's own per-step totals
    logged_allgather_bytes, logged_reduce_scatter_bytes, logged_all_to_all_bytes.

    To compare with a run: enable DeepSpeed's logger in the JSON ("comms_logger": {"enabled": true,
    "prof_all": true}), clear `deepspeed.comm.comms_logger.comms_dict` after the first optimizer
    step (ZeRO-3 records its module trace during the first forward and backward), run K more
    steps, then on any rank sum msg_size x count over the records named all_gather_into_tensor
    (all_gather if torch lacks it) and reduce_scatter_tensor (reduce_scatter), and divide by K.
    Every rank logs its own calls with its own input sizes, which are equal across ranks. The
    SAE group's calls carry their own names (sae_*) and stay out of these totals; checkpoint saves
    gather the weights too, so stop counting before one.
    """
    step = plan_step(recipe, shape, topo, d_sae, **kw)
    keys = ("zero_allgather_fwd", "zero_allgather_bwd", "zero_allgather_persistent", "zero_reduce_scatter")
    out = dict.fromkeys(keys + ("sae_gather_alltoall", "cache_read", "intra_node_bytes", "inter_node_bytes"), 0.0)
    for t in step.traffic:
        key = "sae_gather_alltoall" if t.name.startswith("sae_") else t.name
        out[key] = out.get(key, 0.0) + t.received
        nvlink, nic = link_bytes(t)
        out["intra_node_bytes"] += nvlink
        out["inter_node_bytes"] += nic
    out.update(
        logged_allgather_bytes=step.logged.allgather,
        logged_reduce_scatter_bytes=step.logged.reduce_scatter,
        logged_all_to_all_bytes=step.logged.all_to_all,
    )
    return out


# ----------------------------------------------------------------------------- time


def seconds(t: Traffic, topo: Topology) -> float:
    """Time of a traffic record: per call, the faster NCCL protocol's latency + the slower link's bytes."""
    if t.kind == "host":
        return t.received / (PCIE_GBPS * GB)
    if t.link.group <= 1 or t.calls == 0:
        return 0.0
    nvlink, nic = (b / t.calls for b in link_bytes(t))
    nodes = t.link.nodes
    best = math.inf
    for base, nvl_hop, net_hop, share in PROTOCOLS.values():
        if t.kind == "ring":  # g-1 steps round the ring, nodes-1 of them cross to another node
            lat = base + (t.link.group - nodes) * nvl_hop + (nodes - 1) * net_hop
        else:  # all peers at once: one hop of the slowest link
            lat = base + (net_hop if nodes > 1 else nvl_hop)
        wire = max(nvlink / (topo.intra_gbps * GB * share), nic / (topo.inter_gbps * GB * share))
        best = min(best, lat * 1e-6 + wire)
    return t.calls * best


def flops_per_token(shape, seq: int, forward_only: bool = False) -> float:
    """Model FLOPs per token, the MFU convention (PaLM, Chowdhery et al. 2022, app. B).

    Forward: 2 FLOPs per matmul weight (N, the untied input embedding excluded: it is a lookup)
    plus attention's QK^T and AV, 2 x 2 x T x H x Q per layer (the full T x T square, as the
    convention counts it). Backward is twice the forward: 6 N + 12 L H Q T per token.
    """
    fwd = 2 * shape.matmul_params + 4 * shape.layers * shape.heads * shape.head_dim * seq
    return fwd if forward_only else 3 * fwd


def compute_seconds(recipe, shape, wl: Workload, d_sae: int | None, mfu: float, peak: float) -> tuple[float, float]:
    """(seconds of compute per micro-batch at this MFU, model FLOPs per micro-batch for the MFU figure).

    Policy forward + backward, a live reference's forward, and the SAE encode: each rank encodes
    the group's G x n_max tokens against its d_sae/G features, forward and backward (2 + 2 FLOPs
    per token and weight): 4 x n_max x d_in x d_sae, whatever G.
    """
    tokens = wl.rows * wl.seq_tokens
    model = flops_per_token(shape, wl.seq_tokens) * tokens
    if reference_kind(recipe.loss) == "live":
        model += flops_per_token(shape, wl.seq_tokens, forward_only=True) * tokens
    sae = 4 * wl.rows * wl.response_tokens * shape.hidden * d_sae if recipe.loss.method == "fpo" and d_sae else 0
    return (model + sae) / (peak * 1e12 * mfu), model


def step_time(recipe, shape, topo: Topology, step: StepPlan, d_sae: int | None, mfu: float, peak: float) -> dict:
    """Seconds per optimizer step and what they go to, tokens/s and MFU.

    Per micro-batch, compute splits forward : backward as 2 : 4 (+2 for the checkpointing
    recompute). Parameter gathers are prefetched under compute: the pass waits for its first
    call, and for whatever its gathers (in backward with the reduce-scatter, which shares the
    links) take beyond its compute; the last reduce-scatter bucket trails the backward. The SAE
    collectives wait in full. Per step: the persistent gather, the optimizer step (Adam streams
    ADAM_BYTES per partitioned parameter through HBM; not modelled under optimizer offload) and
    the cache read.
    """
    wl, a = step.workload, step.workload.accumulation
    compute, model_flops = compute_seconds(recipe, shape, wl, d_sae, mfu, peak)
    fwd = compute * 2 / (6 + 2 * recipe.model.gradient_checkpointing)
    zero = sae = 0.0
    for m in range(a):
        by = _phases([t for t in step.traffic if t.micro == m], topo)
        zero += by["fwd"][1] + max(0.0, by["fwd"][0] - by["fwd"][1] - fwd)
        zero += by["bwd"][1] + max(0.0, by["bwd"][0] - by["bwd"][1] + by["rs"][0] - (compute - fwd)) + by["rs"][1]
        sae += by["sae"][0]
    once = sum(seconds(t, topo) for t in step.traffic if t.micro < 0 and t.kind != "host")
    cache = sum(seconds(t, topo) for t in step.traffic if t.kind == "host")
    optimizer = 0.0 if step.zero.offload_optimizer else ADAM_BYTES * shape.params / topo.world / (HBM_GBPS * GB)
    total = a * compute + zero + sae + once + cache + optimizer
    tokens = a * wl.rows * wl.seq_tokens
    return {
        "compute_s": a * compute,
        "zero_exposed_s": zero + once,
        "sae_s": sae,
        "cache_s": cache,
        "optimizer_s": optimizer,
        "step_s": total,
        "tokens_per_s": tokens * topo.world / total,
        "tokens_per_s_per_gpu": tokens / total,
        "mfu": a * model_flops / (total * peak * 1e12),
    }


def _phases(traffic: list[Traffic], topo: Topology) -> dict[str, tuple[float, float]]:
    """One micro-batch's seconds by phase: (all of it, the first call); "rs": (all of it, its last bucket)."""
    out = {k: [0.0, 0.0] for k in ("fwd", "bwd", "sae", "rs")}
    for t in traffic:
        s = seconds(t, topo)
        key = "rs" if t.name == "zero_reduce_scatter" else t.phase
        out[key][0] += s
        out[key][1] = max(out[key][1], s / max(t.calls, 1))
    return {k: (v[0], v[1]) for k, v in out.items()}


# ----------------------------------------------------------------------------- MFU and weak scaling


def bench_mfu() -> list[dict]:
    """FPO's measured MFU in bench/results/*.json (a source checkout's GPU bench runs)."""
    runs = []
    for f in sorted(BENCH_RESULTS.glob("*.json")) if BENCH_RESULTS.is_dir() else []:
        res = json.loads(f.read_text())
        fpo = res.get("methods", {}).get("fpo", {})
        if fpo.get("mfu"):
            micro = res.get("config", {}).get("micro")
            runs.append(
                {"file": f.name, "mfu": statistics.median(fpo["mfu"]), "params": res.get("params"), "micro": micro}
            )
    return runs


def default_mfu(params: int) -> tuple[float, str]:
    """The MFU to assume, and why: a bench run of a model within 4x this size, else ASSUMED_MFU.

    The shipped bench runs are a 152M-parameter model (hidden 1024, 16 layers) on <= 64-token toy
    sequences on one H200: kernels too small to fill the GPU, so launches and ZeRO-3's per-module
    hooks set the step time (MFU 0.005-0.023, rising with the micro-batch: 32 -> 128 pairs raised
    tokens 4x for +10% step time). That says nothing of a 2-9B model on ~1k-token sequences, where
    dense training with ZeRO-3 and activation checkpointing reaches an MFU of ~0.3-0.45 on H100
    (6N convention: the recompute's 2N is not counted); ASSUMED_MFU takes the low middle.
    """
    runs = bench_mfu()
    close = [r for r in runs if r.get("params") and 0.25 <= params / r["params"] <= 4]
    if close:
        mfu = statistics.median(r["mfu"] for r in close)
        return mfu, f"calibrated: FPO's median MFU in bench/results ({', '.join(r['file'] for r in close)})"
    seen = ", ".join(f"{r['mfu']:.3f} (micro {r.get('micro')})" for r in runs)
    why = f"; the bench/results toy runs (152M params, <= 64 tokens) measured {seen}: launch-bound" if runs else ""
    return ASSUMED_MFU, f"assumed for compute alone{why}; set --mfu"


WEAK_NODES = (1, 2, 8, 16, 64)


def weak_scaling(recipe, shape, topo: Topology, d_sae, wl: Workload, mfu: float, peak: float, **kw) -> list[dict]:
    """Step time and MFU on 1-64 nodes at fixed micro-batch and accumulation: weak scaling.

    The global batch grows with the world. Each node count runs the recipe's ZeRO settings without
    and with ZeRO++ (hpZ over the node, qwZ, qgZ), for each SAE shard group.
    """
    base = zero_settings(recipe.deepspeed.config)
    rows = []
    for nodes in WEAK_NODES:
        t = topo._replace(nodes=nodes)
        for zpp in (False, True):
            for group in ("node", "world", "none"):
                step = plan_step(recipe, shape, t, d_sae, group, base.zeropp(topo.gpus, zpp), wl=wl, **kw)
                sae = sum(x.received for x in step.traffic if x.name.startswith("sae_"))
                nic = sum(link_bytes(x)[1] for x in step.traffic)
                timed = step_time(recipe, shape, t, step, d_sae, mfu, peak)
                rows.append(
                    {"nodes": nodes, "zeropp": zpp, "group": group, "sae_bytes": sae, "nic_bytes": nic, **timed}
                )
    return rows
