"""What every collective of one optimizer step moves, per rank: the bytes `fpo-ds plan` times.

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
  ZeRO-2 (stage_1_and_2.py, use_multi_rank_bucket_allreduce, its default): every micro-batch's
      backward all-reduces every gradient, in buckets of reduce_bucket_size elements (zero_allreduce:
      2 (W-1)/W x M received per rank in a ring); after the optimizer step each rank's updated
      partition is all-gathered (zero_allgather_step). Parameters stay whole: no fetches.
  step_syncs  the small all-reduces every optimizer step pays in latency: the trainer's metrics,
      DeepSpeed's gradient norm and its overflow check, and the trainer's one non-finite / stop
      check per optimizer step.

What these bytes cost in time is fpo_ds/tools/planner/links.py; the step time is timing.py.
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple

from fpo_ds.ds_config import path as ds_path
from fpo_ds.tools.planner import zero3_trace
from fpo_ds.tools.planner.links import Link, Topology, Traffic, link_bytes

QUANT_GROUP = 8000  # DeepSpeed's CUDAQuantizer.target_group_size: elements per fp32 scale (qwZ)
RESPONSE_TOKENS = 400  # per sequence, UltraFeedback-like (the worked example)
PROMPT_TOKENS = 200  # per sequence, UltraFeedback-like; capped by data.max_prompt_length
SYNC_BYTES = 64  # a per-step scalar all-reduce (a few fp32 values)


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
    stage: int = 3
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


# ----------------------------------------------------------------------------- settings and workload


def zero_settings(ds_config: str) -> ZeroSettings:
    """The ZeRO knobs of the recipe's DeepSpeed JSON; the planner models ZeRO stages 2 and 3."""
    path = ds_path(ds_config)
    cfg = json.loads(path.read_text())
    zero = cfg.get("zero_optimization", {})
    if zero.get("stage") not in (2, 3):
        raise ValueError(
            f"deepspeed.config: {path} is ZeRO stage {zero.get('stage')}; fpo-ds plan models ZeRO-2 and ZeRO-3 "
            "runs (pick ds_configs/zero3_*.json or zero2_*.json)"
        )
    on_host = lambda key: zero.get(key, {}).get("device", "none") in ("cpu", "nvme")  # noqa: E731
    half = cfg.get("bf16", {}).get("enabled") or cfg.get("fp16", {}).get("enabled")
    d = ZeroSettings(item=2)  # DeepSpeed's defaults for the keys the JSON leaves out
    return ZeroSettings(
        item=2 if half else 4,
        stage=zero["stage"],
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


def workload(
    recipe, topo: Topology, prompt_tokens: int, response_tokens: int, global_batch: int | None = None
) -> tuple[Workload, str]:
    """Micro-batch, accumulation and tokens per sequence at this world, and a note when the batch changed.

    The global batch is the recipe's (or `global_batch`). When it does not divide over micro x world,
    the step is planned at the smallest global batch that does, and the note says so plainly: that
    changes the optimisation (see data_parallel_limit for how far the recipe's own batch goes).
    """
    t, d = recipe.train, recipe.data
    prompt = min(prompt_tokens, d.max_prompt_length)
    response = max(1, min(response_tokens, d.max_length - prompt))
    want = global_batch or t.global_batch_size
    per_step = t.micro_batch_size * topo.world
    acc = max(1, -(-want // per_step))
    note = ""
    if want != acc * per_step:
        note = (
            f"CHANGED the global batch: {want} pairs cannot be split over micro {t.micro_batch_size} x {topo.world} "
            f"ranks (a multiple of {per_step} is needed); the step below is planned at global batch "
            f"{acc * per_step} (accumulation {acc}), which changes the optimisation. With {want} the recipe can use "
            f"at most {data_parallel_limit(want, t.micro_batch_size)} data-parallel ranks"
        )
    return Workload(t.micro_batch_size, acc, prompt + response, response), note


def data_parallel_limit(global_batch: int, micro: int) -> int:
    """The most data-parallel ranks a global batch allows: global batch / micro-batch (accumulation 1)."""
    return max(1, global_batch // micro)


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
    from fpo_ds.encoder import comm_bytes_per_call  # the encoder's own counter: one formula for both

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
            Traffic("sae_token_gather", gather, 1, link, "all_gather", "sae", m),
            Traffic("sae_token_gather_grad", gather, 1, link, "all_to_all", "sae", m),
            Traffic("sae_feature_all_to_all", 2 * a2a, 2, link, "all_to_all", "sae", m),
        ]
        out += [Traffic("sae_topk_gather", topk_bytes, 1, link, "all_gather", "sae", m)] if topk else []
    return out


def cache_traffic(wl: Workload, recipe, k_cache: int) -> list[Traffic]:
    """Offline reference rows read per step (fpo_ds/cache.py's columns, per pair).

    example_id int64 (8) + sum_logps f32 x2 (8) + n_tokens int32 x2 (8), and with SAE features
    feat_idx int32 + feat_val f32 for k_cache entries x2 (16 k) + feat_dropped_max f32 x2 (8).
    """
    if recipe.loss.ref_kind != "offline":
        return []
    per_pair = 24 + (16 * k_cache + 8 if recipe.loss.needs_features else 0)
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
    if z.stage == 2:
        return zero2_traffic(shape, z, topo, wl)
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
    # Micro-batches 2.. repeat micro-batch 1: its records summed per class first (as `merge` would), then copied.
    out += [t._replace(micro=m) for m in range(2, wl.accumulation) for t in merge(again)]
    logged += (wl.accumulation - 2) * sum(t.received / (t.link.group - 1) for t in again) if again else 0.0
    kept = [p for p, k in enumerate(persist) if k]
    if kept:  # after the optimizer step: one all_gather_into_tensor per persistent parameter
        elems = sum(-(-shape.numels[p] // topo.world) for p in kept)
        link = Link(topo.world, min(topo.world, topo.gpus))
        out.append(
            Traffic(
                "zero_allgather_persistent",
                (topo.world - 1) * elems * z.item,
                len(kept),
                link,
                "all_gather",
                "step",
                -1,
            )
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
                Traffic(name, (group - 1) * (elems * item + scales), 1 + bool(scales), link, "all_gather", phase, micro)
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
            Traffic(
                "zero_reduce_scatter",
                (W - 1) / W * padded * z.item,
                calls,
                Link(W, min(W, g)),
                "reduce_scatter",
                "bwd",
                m,
            )
        )
        if sizes:
            out.append(
                Traffic("zero_reduce_scatter", (g - 1) / g * intra, 2 * len(sizes), Link(g, g), "all_to_all", "bwd", m)
            )
            out.append(
                Traffic("zero_reduce_scatter", (n - 1) / n * inter, 2 * len(sizes), Link(n, 1), "all_to_all", "bwd", m)
            )
    return out, Logged(reduce_scatter=a * padded * z.item, all_to_all=a * (intra + inter))


def zero2_traffic(shape, z: ZeroSettings, topo: Topology, wl: Workload) -> tuple[list[Traffic], Logged]:
    """ZeRO-2's collectives of one step: gradient all-reduces per micro-batch, one all-gather per step.

    Each micro-batch all-reduces every gradient in reduce_bucket_size buckets; the step ends with an
    all-gather of every rank's updated partition (padded to a multiple of W elements). The comms
    logger records all_reduce under its own name (Logged keeps the all-gather only).
    """
    W, a = topo.world, wl.accumulation
    if W == 1:
        return [], Logged()
    total = sum(shape.numels)
    calls = _buckets(list(reversed(shape.numels)), z.reduce_bucket)
    link = Link(W, min(W, topo.gpus))
    out = [
        Traffic("zero_allreduce", 2 * (W - 1) / W * total * z.item, calls, link, "all_reduce", "bwd", m)
        for m in range(a)
    ]
    part = -(-total // W)
    out.append(Traffic("zero_allgather_step", (W - 1) * part * z.item, 1, link, "all_gather", "step", -1))
    return out, Logged(allgather=part * z.item)


def step_syncs(topo: Topology, stage: int) -> list[Traffic]:
    """The small all-reduces of every optimizer step, each paid in latency (SYNC_BYTES of payload).

    The trainer's metrics (fpo_ds/metrics.py, one all-reduce) and its non-finite / stop check (one per
    optimizer step); DeepSpeed's gradient norm and its overflow check (one all-reduce each, ZeRO-2
    and ZeRO-3 alike).
    """
    if topo.world == 1:
        return []
    link = Link(topo.world, min(topo.world, topo.gpus))
    got = 2 * (topo.world - 1) / topo.world * SYNC_BYTES
    names = ("metrics_all_reduce", "stop_check", "grad_norm_all_reduce", "overflow_check")
    return [Traffic(n, got, 1, link, "all_reduce", "step", -1) for n in names]


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
    global_batch: int | None = None,
) -> StepPlan:
    """All collectives of one optimizer step for the recipe on this topology.

    `zero` defaults to the recipe's DeepSpeed JSON; `tokens` is (prompt, response) tokens per
    sequence; `sae_k` the k of a TopK SAE (0 otherwise); `wl` fixes micro-batch and accumulation
    (the weak-scaling table), else they come from the recipe at this world.
    """
    z = zero or zero_settings(recipe.deepspeed.config)
    note = ""
    if wl is None:
        wl, note = workload(recipe, topo, *tokens, global_batch)
    group = shard_group_size(recipe.sae.shard_group if shard_group is None else shard_group, topo)
    ckpt = recipe.model.gradient_checkpointing
    traffic, logged = zero_traffic(shape, z, topo, wl, ckpt, recipe.loss.ref_kind)
    if recipe.loss.needs_features and d_sae:
        traffic += sae_traffic(wl, group, topo, shape.hidden, d_sae, z.item, sae_k)
    traffic += cache_traffic(wl, recipe, recipe.cache.k_cache or 4 * recipe.sae.k)
    traffic += step_syncs(topo, z.stage)
    return StepPlan(wl, note, group, z, traffic, logged)


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
