"""`fpo-ds plan RECIPE --tune`: which systems settings run the recipe's global batch fastest on this cluster?

The search keeps the recipe's global batch (the science) and varies only systems settings:
micro-batch (accumulation follows), ZeRO stage 2 or 3, hpZ over the node, ZeRO++'s quantised
gathers and gradients (qwZ + qgZ: CUDA only, so only where the target runs them), the SAE
encoder's shard group and activation checkpointing. Settings that do not fit in 90% of the GPU
(fpo_ds/tools/planner/memory.py) are dropped; the rest are ranked by predicted step time
(fpo_ds/tools/planner/timing.py).
"""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

from fpo_ds.ds_config import path as ds_path
from fpo_ds.tools.planner import comms, memory, timing
from fpo_ds.tools.planner.links import Topology


class Setting(NamedTuple):
    micro: int
    stage: int
    hpz: bool
    zeropp: bool  # qwZ + qgZ (with hpZ)
    group: str  # sae.shard_group
    checkpointing: bool

    @property
    def label(self) -> str:
        zero = "ZeRO-2" if self.stage == 2 else "ZeRO++" if self.zeropp else "ZeRO-3 hpZ" if self.hpz else "ZeRO-3"
        ckpt = "checkpointing" if self.checkpointing else "no checkpointing"
        return f"{zero}, micro {self.micro}, shard group {self.group}, {ckpt}"


def settings(recipe, topo: Topology, global_batch: int, quantized: bool) -> list[Setting]:
    """Every combination that divides the global batch over the world (quantized: ZeRO++ runs here)."""
    micros = [m for m in (1, 2, 4, 8, 16, 32) if global_batch % (m * topo.world) == 0]
    zeros = [(2, False, False), (3, False, False)]
    if topo.nodes > 1:
        zeros.append((3, True, False))
        zeros += [(3, True, True)] if quantized else []
    groups = ("node", "world", "none") if recipe.loss.needs_features else (recipe.sae.shard_group,)
    return [Setting(m, s, h, q, g, c) for m in micros for s, h, q in zeros for g in groups for c in (True, False)]


def apply(recipe, s: Setting):
    """The recipe with a setting's recipe keys (micro-batch, checkpointing, shard group)."""
    return dataclasses.replace(
        recipe,
        train=dataclasses.replace(recipe.train, micro_batch_size=s.micro),
        model=dataclasses.replace(recipe.model, gradient_checkpointing=s.checkpointing),
        sae=dataclasses.replace(recipe.sae, shard_group=s.group),
    )


def zero_of(base: comms.ZeroSettings, s: Setting, topo: Topology) -> comms.ZeroSettings:
    return base._replace(stage=s.stage, hpz=topo.gpus if s.hpz else 1, qwz=s.zeropp, qgz=s.zeropp)


def ds_json(recipe, s: Setting, topo: Topology) -> dict:
    """The recipe's DeepSpeed JSON with this setting's ZeRO keys."""
    cfg = json.loads(ds_path(recipe.deepspeed.config).read_text())
    zero = dict(cfg.get("zero_optimization", {}))
    zero["stage"] = s.stage
    if s.stage == 2:
        zero = {k: v for k, v in zero.items() if not k.startswith(("stage3_", "zero_hpz", "zero_quantized"))}
    else:
        zero.pop("zero_hpz_partition_size", None)
        zero.pop("zero_quantized_weights", None)
        zero.pop("zero_quantized_gradients", None)
        if s.hpz:
            zero["zero_hpz_partition_size"] = topo.gpus
        if s.zeropp:
            zero.update(zero_quantized_weights=True, zero_quantized_gradients=True)
    return {**cfg, "zero_optimization": zero}


def overrides(s: Setting, ds: dict) -> list[str]:
    """The recipe overrides of a setting; deepspeed.config names a shipped JSON equal to `ds`, if one is."""
    shipped = ds_path("ds_configs/zero3_bf16.json").parent
    same = [f for f in sorted(shipped.glob("*.json")) if json.loads(f.read_text()) == ds]
    return [
        f"train.micro_batch_size={s.micro}",
        f"model.gradient_checkpointing={str(s.checkpointing).lower()}",
        f"sae.shard_group={s.group}",
        f"deepspeed.config={'ds_configs/' + same[0].name if same else '<the JSON below, saved>'}",
    ]


def evaluate(
    recipe, shape, topo: Topology, s: Setting, d_sae, mfu: float, peak: float, global_batch: int, micro_s=None, **kw
):
    """Predicted step time and memory of one setting: {"setting", "step_s", "gpu_bytes", "timed"}.

    `micro_s`: a measured compute time per micro-batch instead of the MFU's (the emulated-cluster test).
    """
    r = apply(recipe, s)
    z = zero_of(comms.zero_settings(recipe.deepspeed.config), s, topo)
    step = comms.plan_step(r, shape, topo, d_sae, s.group, z, global_batch=global_batch, **kw)
    timed = timing.step_time(r, shape, topo, step, d_sae, mfu, peak, micro_s)
    items = memory.estimate(r, shape._asdict(), topo.nodes, topo.gpus, d_sae, s.group, zero=z)
    gpu = sum(v for k, v in items.items() if not k.startswith("host"))
    return {"setting": s, "step_s": timed["step_s"], "gpu_bytes": gpu, "timed": timed, "step": step}


def search(recipe, shape, topo, d_sae, mfu, peak, gpu_bytes, global_batch, quantized=True, **kw) -> list[dict]:
    """Every fitting setting, fastest first."""
    out = []
    for s in settings(recipe, topo, global_batch, quantized):
        res = evaluate(recipe, shape, topo, s, d_sae, mfu, peak, global_batch, **kw)
        if res["gpu_bytes"] <= 0.9 * gpu_bytes:
            out.append(res)
    return sorted(out, key=lambda r: r["step_s"])
