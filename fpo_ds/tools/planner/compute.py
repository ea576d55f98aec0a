"""How much compute one training step is, and how fast the accelerator runs it (the MFU).

One FLOPs convention, used by `fpo-ds plan` for its compute time and by the benchmark
(fpo_ds/tools/benchmarks/bench.py) for the MFU it reports, so that a measured MFU can be fed back
into the plan unchanged (`train_flops_per_token`):

  6N per token            forward 2N + backward 4N, N = the parameters used in a matmul per token
                          (all but an untied input embedding: a lookup)
  + attention             QK^T and AV over the full T x T square, 4 x L x H x Q x T per token
                          forward (the convention of PaLM, Chowdhery et al. 2022, app. B), x3 with
                          the backward
  + recompute             with activation checkpointing the backward re-runs each layer's forward:
                          another 2N + 4 L H Q T. This counts work the GPU really does (hardware
                          FLOPs), so an MFU measured with checkpointing on stays comparable.
  + live reference        a frozen reference engine's forward (TDPO, DPO with a live reference)

The MFU itself is not knowable offline. Without a calibration the plan prints its times at both
ends of MFU_RANGE, each bound with its source; `--mfu X` or `--calibrate BENCH.json` (a bench run,
its MFU read in this convention) pins one value. The output always says which.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import NamedTuple

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16 (no sparsity), the bench's --peak-tflops
HBM_GBPS = 3350.0  # H100 SXM HBM3
CONVENTION = "6N + attention (full T x T) + recompute when checkpointing"


class Mfu(NamedTuple):
    value: float
    source: str


MFU_RANGE = (
    Mfu(
        0.10,
        "low: at the one GPU run of this code at billion-parameter scale (bench/results/h200-gemma-2-2b-bench.json: "
        "FPO, Gemma-2-2B, one H200, micro 2, checkpointing, 1k-token sequences; 0.098 as first reported in 6N, "
        "0.14 in this convention); a multi-GPU run can only be slower",
    ),
    Mfu(
        0.40,
        "high: well-tuned public dense training of this class on H100 (fms-fsdp, 7B on 96 GPUs: ~7,500 "
        "tokens/s/GPU; torchtitan, Llama-3-8B: MFU 0.57 without recompute), scaled to 9B with full recompute "
        "~4,000-4,500 tokens/s/GPU = MFU 0.31-0.34 in this convention; 0.40 bounds it from above",
    ),
)


def train_flops_per_token(shape, seq: int, recompute: bool, forward_only: bool = False) -> float:
    """Model FLOPs per token of one sequence of `seq` tokens, in the convention above.

    forward_only: a frozen model's forward (2N + attention), e.g. a live reference.
    """
    fwd = 2 * shape.matmul_params + 4 * shape.layers * shape.heads * shape.head_dim * seq
    if forward_only:
        return fwd
    return fwd * (3 + bool(recompute))


def step_flops(recipe, shape, rows: int, seq: int, response: int, d_sae: int | None, live_reference: bool) -> float:
    """FLOPs of one micro-batch: `rows` sequences of `seq` tokens (`response` of them encoded by the SAE).

    The SAE encode on each rank covers its group's tokens against its d_sae/G features, forward and
    backward (2 + 2 FLOPs per token and weight): 4 x tokens x d_in x d_sae in total, whatever G.
    """
    tokens = rows * seq
    flops = train_flops_per_token(shape, seq, recipe.model.gradient_checkpointing) * tokens
    if live_reference:
        flops += train_flops_per_token(shape, seq, False, forward_only=True) * tokens
    if recipe.loss.needs_features and d_sae:
        flops += 4 * rows * response * shape.hidden * d_sae
    return flops


def convert_mfu(mfu: float, flops_then: float, flops_now: float) -> float:
    """An MFU reported with `flops_then` FLOPs per token, re-expressed with `flops_now` (same tokens/s)."""
    return mfu * flops_now / flops_then


# DeepSpeed-free bench results before this convention counted these multiples of the parameter count
# per token (fpo_ds/tools/benchmarks/bench.py until its MFU moved here): 6N, or 8N with a live reference.
OLD_BENCH_MULTIPLE = {"sft": 6, "simpo": 6, "dpo_live": 8, "dpo_cache": 6, "tdpo2": 8, "fpo": 6}


def bench_mfu(path: Path, method: str = "fpo") -> Mfu:
    """The median MFU of `method` in a bench result, in this convention (older results are converted).

    Results that name `flops_convention` are already in it; older ones counted OLD_BENCH_MULTIPLE x
    params per token, and are converted with the run's own shape, sequence length and checkpointing.
    """
    res = json.loads(Path(path).read_text())
    runs = res.get("methods", {}).get(method, {}).get("mfu")
    if not runs:
        raise ValueError(f"--calibrate: {path} has no MFU for {method} (re-run the bench with --peak-tflops)")
    mfu = statistics.median(runs)
    cfg = res.get("config", {})
    if res.get("flops_convention") == CONVENTION:
        return Mfu(mfu, f"--calibrate {Path(path).name}: {method} median MFU {mfu:.3f}")
    shape = _bench_shape(cfg)
    if shape is None:
        raise ValueError(f"--calibrate: {path} predates the FLOPs convention and names no model shape to convert it")
    now = train_flops_per_token(shape, cfg["seq"], cfg.get("checkpointing", False))
    then = OLD_BENCH_MULTIPLE[method] * res["params"]
    new = convert_mfu(mfu, then, now)
    multiple = OLD_BENCH_MULTIPLE[method]
    return Mfu(
        new, f"--calibrate {Path(path).name}: {method} median MFU {mfu:.3f} as reported ({multiple}N), {new:.3f} here"
    )


def _bench_shape(cfg: dict):
    """The shape a bench run trained: a shipped architecture (--shape), else None."""
    from fpo_ds.tools.planner import shapes

    if cfg.get("shape") and not cfg.get("shrink_hidden") and not cfg.get("shrink_layers"):
        return shapes.model_shape(cfg["shape"])
    return None


def compute_seconds(flops: float, mfu: float, peak_tflops: float) -> float:
    """Seconds for `flops` at this MFU of the peak."""
    return flops / (peak_tflops * 1e12 * mfu)


def quant_seconds(sent: float, received: float, hbm_gbps: float = HBM_GBPS) -> float:
    """ZeRO++ quantisation kernels' own time: `sent` elements quantised, `received` dequantised.

    Source: an HBM-bound estimate, not a measurement (DeepSpeed's quantizer kernels need CUDA; none ran
    here). The quantizer (DeepSpeed csrc/quantization) reads 16 bits and writes 8 (qwZ) or 4 (qgZ) plus
    fp32 scales, the dequantizer the reverse: ~3 bytes per element each way through HBM, assumed at
    half its bandwidth (small, irregular launches).
    """
    return 3 * (sent + received) / (0.5 * hbm_gbps * 1e9)
