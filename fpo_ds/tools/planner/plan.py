"""`fpo-ds plan RECIPE --nodes N --gpus-per-node G`: will this recipe fit, and how fast will it run?

Works offline: the model is built on the meta device from its config (a local directory's
config.json, or the shapes shipped in fpo_ds/tools/planner/shapes.py for the recipes' hub models),
the SAE width comes from sae-lens's registry (or `sae.path`/cfg.json, or --d-sae).

Prints: per-GPU memory (memory.py); the batch — the recipe's global batch is kept, the most
data-parallel ranks it allows is printed, and any change is said plainly; the bytes of every
collective per step and rank (comms.py) and their time (links.py); the step time (timing.py) at
a stated MFU range or a pinned MFU (compute.py); a strong-scaling table (fixed global batch, 1
node up to the data-parallel limit, with time per epoch) and a weak-scaling table (each row's
global batch written in it); advice with numbers. `--tune` ranks systems settings (tune.py);
`--markdown` prints the README's scaling section and the recipe header's plan line.
"""

from __future__ import annotations

import argparse
import json
import math

from fpo_ds import config as C
from fpo_ds.tools.planner import comms, compute, links, memory, timing, tune

GIB = memory.GIB
EXIT_DOES_NOT_FIT = 3


# ----------------------------------------------------------------------------- formatting


def size(b: float) -> str:
    """Bytes in decimal units: 81.87 GB, 333.3 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.4g} {unit}"
    return f"{b:.0f} B"


def secs(s: float) -> str:
    return f"{s:.3f} s" if s >= 0.01 else f"{s:.2g} s"


def span(values: list[float]) -> str:
    """One time, or the range over the MFU bounds (fastest-slowest)."""
    if len(values) == 1:
        return secs(values[0])
    lo, hi = min(values), max(values)
    return f"{lo:.3g}-{hi:.3g} s"


def duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"


def comm_table(step: comms.StepPlan, topo: links.Topology) -> list[str]:
    """One line per collective class and link: calls, bytes received, over the in-node links / the NIC, seconds."""
    rows: dict[tuple, list[float]] = {}
    for t in step.traffic:
        nvlink, nic = links.link_bytes(t)
        row = rows.setdefault((t.name, t.link, t.kind), [0.0] * 5)
        for i, v in enumerate((t.calls, t.received, nvlink, nic, links.seconds(t, topo))):
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


def time_line(timed: dict, mfu: compute.Mfu) -> str:
    """Where one step's seconds go at one MFU, tokens/s."""
    return (
        f"  MFU {mfu.value:.2f}: compute {timed['compute_s']:.3f} s + ZeRO exposed {timed['zero_exposed_s']:.3f} s + "
        f"SAE {timed['sae_s']:.3f} s + syncs {timed['sync_s']:.2g} s + cache {timed['cache_s']:.2g} s + optimizer "
        f"{timed['optimizer_s']:.3f} s + quantisation {timed['quant_s']:.3f} s = step {timed['step_s']:.3f} s; "
        f"{timed['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, MFU with communication {timed['mfu']:.3f}"
    )


def strong_table(rows: list[dict], mfus: list[compute.Mfu], pairs: int | None, global_batch: int) -> list[str]:
    """Markdown: fixed global batch, step time and time per epoch per node count."""
    steps = math.ceil(pairs / global_batch) if pairs else None
    head = "| nodes | GPUs | accumulation | step | " + ("epoch |" if steps else "")
    out = [head, "|---" * (4 + bool(steps)) + "|"]
    for r in rows:
        epoch = f" {span([steps * s / 3600 for s in r['step_s']])[:-2]} h |" if steps else ""
        out.append(f"| {r['nodes']} | {r['gpus']} | {r['accumulation']} | {span(r['step_s'])} |{epoch}")
    return out


def weak_table(rows_by_mfu: list[list[dict]], gpus: int) -> list[str]:
    """Markdown: step time per node count, ZeRO-3 and ZeRO++, each SAE shard group; then the bytes."""
    combos = [(z, g) for z in (False, True) for g in ("node", "world", "none")]
    head = " | ".join(f"{'ZeRO++' if z else 'ZeRO-3'} {g}" for z, g in combos)
    out = [f"| nodes | GPUs | global batch | {head} |", "|---" * (3 + len(combos)) + "|"]
    nic = ["| nodes | ZeRO-3 NIC | ZeRO++ NIC | SAE (node) | SAE (world) | SAE (none) |", "|---" * 6 + "|"]
    for nodes in timing.WEAK_NODES:
        ats = [{(r["zeropp"], r["group"]): r for r in rows if r["nodes"] == nodes} for rows in rows_by_mfu]
        at = ats[0]
        cells = " | ".join(span([a[c]["step_s"] for a in ats]) for c in combos)
        out.append(f"| {nodes} | {nodes * gpus} | {at[(False, 'node')]['global_batch']} | {cells} |")
        gb = [at[(False, "node")]["nic_bytes"], at[(True, "node")]["nic_bytes"]]
        gb += [at[(False, g)]["sae_bytes"] for g in ("node", "world", "none")]
        nic.append(f"| {nodes} | " + " | ".join(size(b) for b in gb) + " |")
    title = "Bytes per rank per step (NIC: over the rank's network link, shard group node; SAE: the encoder group)"
    return [*out, "", title, *nic]


# ----------------------------------------------------------------------------- advice


def comm_advice(timed: dict, step: comms.StepPlan, zeropp: dict, topo: links.Topology) -> list[str]:
    """Where communication dominates: what to change, with the projected step time (`zeropp`: with ZeRO++)."""
    tips = []
    share = timed["zero_exposed_s"] / timed["step_s"]
    if share > 0.2 and step.zero.hpz <= 1 and zeropp["step_s"] < 0.9 * timed["step_s"]:
        tips.append(
            f"ZeRO-3 communication is {100 * share:.0f}% of the step: deepspeed.config=ds_configs/zero3pp_bf16.json "
            f"(ZeRO++: hpZ keeps all but each step's first parameter gather inside the node) -> step "
            f"{zeropp['step_s']:.3g} s"
        )
    if share > 0.2:
        tips.append(
            f"ZeRO-3 communication is {100 * share:.0f}% of the step, and it runs every micro-batch: a larger "
            "train.micro_batch_size (memory permitting) moves the same bytes for more tokens"
        )
    sae_share = timed["sae_s"] / timed["step_s"]
    if sae_share > 0.05 and step.group > topo.gpus:
        tips.append(f"SAE traffic is {100 * sae_share:.0f}% of the step: sae.shard_group=node keeps it on NVLink")
    elif sae_share > 0.05:
        tips.append(f"SAE traffic is {100 * sae_share:.0f}% of the step: sae.shard_group=none (whole encoder per rank)")
    if not tips:
        tips.append(f"compute-bound: communication adds {100 * (1 - timed['compute_s'] / timed['step_s']):.0f}%")
    return tips


def batch_advice(recipe, shape, topo, d_sae, mfu: compute.Mfu, peak: float, global_batch: int, kw: dict) -> list[str]:
    """Where the world exceeds what the global batch allows: the options, each with its step time."""
    micro = recipe.train.micro_batch_size
    limit = comms.data_parallel_limit(global_batch, micro)
    if topo.world <= limit and global_batch % (micro * topo.world) == 0:
        return []

    def at(r, t, g):
        step = comms.plan_step(r, shape, t, d_sae, global_batch=g, **kw)
        return timing.step_time(r, shape, t, step, d_sae, mfu.value, peak)["step_s"]

    tips = []
    if micro > 1 and global_batch % topo.world == 0:
        import dataclasses

        r1 = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, micro_batch_size=1))
        tips.append(
            f"smaller micro-batch: train.micro_batch_size=1 raises the limit to {global_batch} ranks; "
            f"at {topo.world} ranks: step {at(r1, topo, global_batch):.3g} s (MFU {mfu.value:.2f})"
        )
    bigger = micro * topo.world
    tips.append(
        f"larger batch: train.global_batch_size={bigger} (micro {micro} x {topo.world} ranks, accumulation 1) -> "
        f"step {at(recipe, topo, bigger):.3g} s for {bigger / global_batch:.0f}x the pairs; the paper's "
        f"{global_batch} is part of its recipe: retune train.lr (and warm-up) and check the results match"
    )
    nodes = max(1, limit // topo.gpus)
    while nodes > 1 and global_batch % (micro * nodes * topo.gpus):
        nodes -= 1
    fewer = topo._replace(nodes=nodes)
    if global_batch % (micro * fewer.world) == 0:
        tips.append(
            f"fewer nodes: --nodes {nodes} ({fewer.world} ranks, the data-parallel limit at micro {micro}) keeps "
            f"global batch {global_batch}: step {at(recipe, fewer, global_batch):.3g} s"
        )
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
    p.add_argument("--calibrate", help="a bench result JSON (bench/results/*.json): pin the MFU to its FPO median")
    p.add_argument("--tune", action="store_true", help="rank systems settings at the recipe's global batch")
    p.add_argument("--markdown", action="store_true", help="print the README's scaling section and the plan line")
    p.add_argument("--no-quantized", action="store_true", help="with --tune: the target cannot run qwZ/qgZ (no CUDA)")
    numbers = [  # flag, type, default, help
        ("--intra-gbps", float, links.INTRA_GBPS, "in-node bus bandwidth per GPU, GB/s (360: NVLink 4 moves 450 per "
         "direction, NCCL ~80%%)"),
        ("--inter-gbps", float, links.INTER_GBPS, "network bandwidth per GPU's NIC, GB/s (40: InfiniBand NDR 400 "
         "Gb/s = 50, ~80%%)"),
        ("--peak-tflops", float, compute.PEAK_TFLOPS, "dense peak per GPU (989: H100 SXM bf16)"),
        ("--mfu", float, None, "pin the compute MFU (default: print the range MFU_RANGE with its sources)"),
        ("--global-batch", int, None, "plan at this global batch (pairs per step) instead of the recipe's"),
        ("--dataset-pairs", int, None, "training pairs per epoch (default: known for the recipes' data set)"),
        ("--prompt-tokens", int, comms.PROMPT_TOKENS, "prompt tokens per sequence (200, UltraFeedback-like)"),
        ("--response-tokens", int, comms.RESPONSE_TOKENS, "response tokens per sequence (400, UltraFeedback-like)"),
    ]  # fmt: skip
    for flag, kind, default, text in numbers:
        p.add_argument(flag, type=kind, default=default, help=text)
    return p


def mfus_of(args) -> tuple[list[compute.Mfu], str]:
    """The MFU(s) to print times for, and a line saying which and why."""
    if args.mfu:
        m = compute.Mfu(args.mfu, "--mfu")
        return [m], f"MFU {m.value:.2f} (pinned: --mfu)"
    if args.calibrate:
        m = compute.bench_mfu(args.calibrate)
        return [m], f"MFU {m.value:.3f} (pinned: {m.source})"
    low, high = compute.MFU_RANGE
    text = (
        f"MFU not calibrated at this model's size: times for MFU {low.value:.2f}-{high.value:.2f} (FLOPs: "
        f"{compute.CONVENTION}; pin one with --mfu or --calibrate BENCH.json)\n    {low.source}\n    {high.source}"
    )
    return [low, high], text


class Context:
    """What every section of the output needs, resolved once from the arguments."""

    def __init__(self, args):
        from fpo_ds.tools.planner import shapes

        recipe = C.load(args.recipe, args.overrides)
        self.shape = shapes.model_shape(recipe.model.name_or_path)
        self.topo = links.Topology(args.nodes, args.gpus_per_node, args.intra_gbps, args.inter_gbps)
        self.recipe = _resolve_auto(recipe, self.shape, self.topo, args.gpu_mem)
        self.group = args.shard_group or self.recipe.sae.shard_group
        d_sae, self.sae_source = shapes.sae_width(self.recipe.sae, self.shape.hidden, args.d_sae)
        self.d_sae = d_sae if self.recipe.loss.needs_features else None
        topk = args.sae_topk if args.sae_topk is not None else shapes.sae_topk(self.recipe.sae)
        self.kw = {"tokens": (args.prompt_tokens, args.response_tokens), "sae_k": topk}
        self.mfus, self.mfu_text = mfus_of(args)
        self.peak = args.peak_tflops
        self.global_batch = args.global_batch or self.recipe.train.global_batch_size
        self.pairs = args.dataset_pairs or timing.dataset_pairs(self.recipe)
        self.gpu_bytes = args.gpu_mem * GIB

    def step(self, topo=None, zero=None, group=None, **kw):
        return comms.plan_step(
            self.recipe, self.shape, topo or self.topo, self.d_sae, group or self.group, zero,
            global_batch=self.global_batch, **self.kw, **kw,
        )  # fmt: skip

    def one_node_workload(self) -> comms.Workload:
        """Micro-batch and accumulation of the global batch on one node: what weak scaling holds fixed."""
        return self.step(topo=self.topo._replace(nodes=1)).workload

    def times(self, step, topo=None) -> list[dict]:
        t = topo or self.topo
        return [timing.step_time(self.recipe, self.shape, t, step, self.d_sae, m.value, self.peak) for m in self.mfus]


def _library_logs_to_stderr() -> None:
    """Stdout holds the plan alone (users save it to a file); DeepSpeed's logger writes to stdout by default."""
    import contextlib
    import logging
    import sys

    with contextlib.redirect_stdout(sys.stderr):  # a first import makes the handler (on sys.stdout) and logs
        from deepspeed.utils import logger
    for h in logger.handlers:  # imported before: move its handler
        if type(h) is logging.StreamHandler and h.stream is not sys.__stderr__:
            h.setStream(sys.__stderr__)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_intermixed_args(argv)  # key=value overrides may follow the flags
    _library_logs_to_stderr()
    ctx = Context(args)
    if args.markdown:
        print(markdown(ctx, args))
        return
    recipe, shape, topo = ctx.recipe, ctx.shape, ctx.topo
    print(
        f"{recipe.model.name_or_path}: {shape.params / 1e6:,.1f}M params, {shape.layers} layers, hidden "
        f"{shape.hidden}, vocab {shape.vocab}; {args.nodes} x {args.gpus_per_node} GPUs; {recipe.deepspeed.config}"
    )
    if recipe.model.lora.enabled:  # LoRA's own memory and FLOPs (planner/lora_plan.py)
        from fpo_ds.tools.planner import lora_plan, shapes

        hf_config = shapes.model_config(recipe.model.name_or_path)
        print("\n".join(lora_plan.lines(recipe, hf_config, shape.params, topo.nodes * topo.gpus, args.gpu_mem)))
    fits = _print_memory(ctx, args.gpu_mem)
    if recipe.loss.needs_features:
        size_ = comms.shard_group_size(ctx.group, topo)
        print(
            f"SAE: {ctx.d_sae or 'unknown (pass --d-sae)'} features ({ctx.sae_source}); "
            f"shard group {ctx.group} = {size_} ranks"
        )
    step = ctx.step()
    _print_batch(ctx, step)
    print("Communication per optimizer step and rank (bytes received; ring / all-to-all on the group's links):")
    print("\n".join(comm_table(step, topo)))
    print(
        f"Time per step: {ctx.peak:.0f} TFLOPS peak; in-node {topo.intra_gbps:.0f} GB/s, "
        f"network {topo.inter_gbps:.0f} GB/s per GPU"
    )
    print(f"  {ctx.mfu_text}")
    timed = ctx.times(step)
    for t, m in zip(timed, ctx.mfus):
        print(time_line(t, m))
    _print_strong(ctx)
    _print_weak(ctx, ctx.one_node_workload())
    if args.tune:
        _print_tune(ctx, not args.no_quantized)
    pp = ctx.step(zero=step.zero.zeropp(topo.gpus, True))
    print("\nAdvice:")
    for line in comm_advice(timed[0], step, ctx.times(pp)[0], topo):
        print(f"- {line}")
    for line in batch_advice(recipe, shape, topo, ctx.d_sae, ctx.mfus[0], ctx.peak, ctx.global_batch, ctx.kw):
        print(f"- {line}")
    if not fits:  # scripts that ask "does it fit?" read the exit status
        raise SystemExit(EXIT_DOES_NOT_FIT)


def _resolve_auto(recipe: C.Recipe, shape, topo: links.Topology, gpu_mem: float) -> C.Recipe:
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
        print(f"(the plan models {zero3} below, what auto would pick on smaller GPUs)")
    return dataclasses.replace(recipe, deepspeed=dataclasses.replace(recipe.deepspeed, config=zero3))


def _print_memory(ctx: Context, gpu_mem: float) -> bool:
    """Print the memory table and advice; True when the recipe fits."""
    items = memory.estimate(ctx.recipe, ctx.shape._asdict(), ctx.topo.nodes, ctx.topo.gpus, ctx.d_sae, ctx.group)
    print("Memory per GPU:")
    for k, v in items.items():
        size = f"{v / GIB:8.2f} GiB {v / 2**20:12,.1f} MiB" if v >= 2**20 else f"{v / 2**10:8.1f} KiB"  # never "0.00"
        print(f"  {k:24s} {size}{'   (host memory, not GPU)' if k.startswith('host_') else ''}")
    lines = memory.advice(items, ctx.recipe, gpu_mem * GIB)
    for line in lines:
        print(f"  {line}")
    return not lines[0].startswith("does NOT fit")


def _print_batch(ctx: Context, step: comms.StepPlan) -> None:
    wl, t = step.workload, ctx.recipe.train
    limit = comms.data_parallel_limit(ctx.global_batch, t.micro_batch_size)
    source = "--global-batch" if ctx.global_batch != t.global_batch_size else "the recipe's train.global_batch_size"
    print(
        f"\nBatch: global batch {ctx.global_batch} pairs ({source}); data-parallel limit {limit} ranks "
        f"(global batch {ctx.global_batch} / micro-batch {t.micro_batch_size})"
    )
    print(
        f"  this plan: micro {wl.micro} x {ctx.topo.world} ranks x accumulation {wl.accumulation} = "
        f"{wl.micro * ctx.topo.world * wl.accumulation} pairs per step; {wl.rows} sequences per micro-batch of "
        f"{wl.seq_tokens} tokens ({wl.response_tokens} response; --prompt-tokens / --response-tokens)"
    )
    if step.note:
        print(f"  {step.note}")


def _print_strong(ctx: Context) -> None:
    rows = timing.strong_scaling(
        ctx.recipe, ctx.shape, ctx.topo, ctx.d_sae, [m.value for m in ctx.mfus], ctx.peak, ctx.global_batch,
        shard_group=ctx.group, **ctx.kw,
    )  # fmt: skip
    pairs = f", epoch = {ctx.pairs:,} pairs" if ctx.pairs else ""
    print(
        f"\nStrong scaling: global batch {ctx.global_batch} fixed, {ctx.recipe.deepspeed.config}, shard group "
        f"{ctx.group}{pairs}; step and epoch time at {_mfu_words(ctx.mfus)}"
    )
    if not rows:
        print(f"  (no node count of {ctx.topo.gpus} GPUs divides global batch {ctx.global_batch})")
    print("\n".join(strong_table(rows, ctx.mfus, ctx.pairs, ctx.global_batch)))


def _mfu_words(mfus: list[compute.Mfu]) -> str:
    return (
        f"MFU {mfus[0].value:.2f}" if len(mfus) == 1 else f"MFU {mfus[1].value:.2f} (fast end) to {mfus[0].value:.2f}"
    )


def _print_weak(ctx: Context, wl: comms.Workload) -> None:
    rows = [
        timing.weak_scaling(ctx.recipe, ctx.shape, ctx.topo, ctx.d_sae, wl, m.value, ctx.peak, **ctx.kw)
        for m in ctx.mfus
    ]
    print(
        f"\nWeak scaling: micro {wl.micro} x accumulation {wl.accumulation} per rank fixed, so the global batch "
        f"grows with the world (each row says its global batch; beyond {ctx.global_batch} it is not the recipe's); "
        f"step seconds at {_mfu_words(ctx.mfus)}, {ctx.recipe.deepspeed.config} without and with ZeRO++ "
        "(hpZ over the node, qwZ, qgZ), per SAE shard group"
    )
    print("\n".join(weak_table(rows, ctx.topo.gpus)))


def _print_tune(ctx: Context, quantized: bool) -> None:
    mfu = ctx.mfus[0]
    ranked = tune.search(
        ctx.recipe, ctx.shape, ctx.topo, ctx.d_sae, mfu.value, ctx.peak, ctx.gpu_bytes, ctx.global_batch,
        quantized, **ctx.kw,
    )  # fmt: skip
    print(
        f"\nTune: fastest settings at global batch {ctx.global_batch} on {ctx.topo.nodes} x {ctx.topo.gpus} GPUs "
        f"that fit {0.9 * ctx.gpu_bytes / GIB:.0f} GiB (ranked at MFU {mfu.value:.2f}; {len(ranked)} fit)"
        + ("" if quantized else "; qwZ/qgZ left out (--no-quantized)")
    )
    for i, r in enumerate(ranked[:3], 1):
        s = r["setting"]
        print(f"{i}. {s.label}: step {r['step_s']:.3f} s, {r['gpu_bytes'] / GIB:.1f} GiB/GPU")
        ds = tune.ds_json(ctx.recipe, s, ctx.topo)
        print(f"   overrides: {' '.join(tune.overrides(s, ds))}")
        print(f"   DeepSpeed JSON: {json.dumps(ds, sort_keys=True)}")


# ----------------------------------------------------------------------------- markdown


def plan_line(ctx: Context, args) -> str:
    """The recipe header's plan line (tests/test_plan.py checks every recipe carries today's)."""
    timed = ctx.times(ctx.step())
    items = memory.estimate(ctx.recipe, ctx.shape._asdict(), ctx.topo.nodes, ctx.topo.gpus, ctx.d_sae, ctx.group)
    gib = sum(v for k, v in items.items() if not k.startswith("host")) / GIB
    where = f" --nodes {ctx.topo.nodes}" if ctx.topo.nodes > 1 else ""
    mfu = "/".join(f"{m.value:.2f}" for m in reversed(ctx.mfus))
    step = span([t["step_s"] for t in timed])
    return f"# Plan (fpo-ds plan {args.recipe}{where}): {gib:.1f} GiB/GPU, {step}/step at MFU {mfu}"


def markdown(ctx: Context, args) -> str:
    """The README's scaling block (tables + the MFU they assume), then the recipe header's plan line.

    tests/test_plan.py checks that the README and the recipes hold exactly this.
    """
    strong = timing.strong_scaling(
        ctx.recipe, ctx.shape, ctx.topo, ctx.d_sae, [m.value for m in ctx.mfus], ctx.peak, ctx.global_batch,
        shard_group=ctx.group, **ctx.kw,
    )  # fmt: skip
    wl = ctx.one_node_workload()
    weak = [
        timing.weak_scaling(ctx.recipe, ctx.shape, ctx.topo, ctx.d_sae, wl, m.value, ctx.peak, **ctx.kw)
        for m in ctx.mfus
    ]
    cmd = " ".join(["fpo-ds plan", args.recipe, f"--nodes {ctx.topo.nodes} --gpus-per-node {ctx.topo.gpus}"])
    pairs = f"; epoch = {ctx.pairs:,} pairs" if ctx.pairs else ""
    return "\n".join(
        [
            f"`{cmd} --markdown`; times at {_mfu_words(ctx.mfus)} ({compute.CONVENTION}), "
            f"{ctx.peak:.0f} TFLOPS peak, {ctx.topo.intra_gbps:.0f} / {ctx.topo.inter_gbps:.0f} GB/s per GPU in / "
            f"across nodes, {ctx.kw['tokens'][0]} prompt + {ctx.kw['tokens'][1]} response tokens.",
            "",
            f"Strong scaling: global batch {ctx.global_batch} fixed (data-parallel limit "
            f"{comms.data_parallel_limit(ctx.global_batch, ctx.recipe.train.micro_batch_size)} ranks), "
            f"{ctx.recipe.deepspeed.config}, shard group {ctx.group}{pairs}:",
            "",
            *strong_table(strong, ctx.mfus, ctx.pairs, ctx.global_batch),
            "",
            f"Weak scaling: micro {wl.micro} x accumulation {wl.accumulation} per rank, the global batch grows "
            "with the world (each row's is in it); without and with ZeRO++, per SAE shard group:",
            "",
            *weak_table(weak, ctx.topo.gpus),
            "",
            f"Recipe header: {plan_line(ctx, args)}",
        ]
    )


if __name__ == "__main__":
    main()
