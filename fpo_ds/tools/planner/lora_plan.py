"""`fpo-ds plan` for a LoRA recipe (model.lora): memory and FLOPs of training adapters on a frozen base.

Kept apart from the full-parameter model of the other planner modules. Per GPU, in bf16
(fpo_ds/zero_auto.py's items, with T adapter parameters of P):

    weights            (P + T) x 2           the frozen base whole (stage 0 / ZeRO-2) or / N (ZeRO-3)
    gradients          T x 2                 none for frozen weights
    optimizer states   T x 12                Adam's two fp32 moments and the fp32 master copy
    live reference     0                     the base with the adapters off: no second copy

FLOPs per trained token (Kaplan's 2 x parameters per forward token): the policy's forward 2P and
its backward 2P (gradients of the activations only: no weight gradients for frozen weights) plus
6T for the adapters, + 2P with activation checkpointing (the forward again). A live reference
(DPO, IPO, TDPO) still runs a forward, 2P; FPO reads its reference from the cache. Full-parameter
training: 6P (+ 2P checkpointing, + 2P live reference).
"""

from __future__ import annotations

GIB = 2**30


def flops_per_token(params: int, trainable: int | None, checkpointing: bool, live_reference: bool) -> float:
    """Training FLOPs per token; `trainable` None: full-parameter training (every weight gets a gradient)."""
    p = float(params)
    train = 6 * p if trainable is None else 4 * p + 6 * trainable
    return train + (2 * p if checkpointing else 0.0) + (2 * p if live_reference else 0.0)


def lines(recipe, hf_config, params: int, gpus: int, gpu_mem_gib: float) -> list[str]:
    """The LoRA section of a plan: adapters, per-GPU memory and auto's stage, FLOPs against full parameters."""
    from fpo_ds import lora, zero_auto

    t = lora.count_trainable(recipe.model, hf_config)
    facts = zero_auto.ModelFacts(params, hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.vocab_size)
    choice = zero_auto.choose(recipe, facts, gpus, int(gpu_mem_gib * GIB), True, trainable=t)
    stage = choice.systems["zero_optimization"]["stage"]
    items = zero_auto.rank_bytes(recipe, facts, gpus, 2, min(stage, 2), t)
    if stage == 3:
        items["weights"] //= gpus
    full = zero_auto.rank_bytes(recipe, facts, gpus, 2, 2)
    live = recipe.loss.ref_kind == "live"
    ckpt = recipe.model.gradient_checkpointing
    lo, hi = flops_per_token(params, t, ckpt, live), flops_per_token(params, None, ckpt, live)
    lo_cfg = recipe.model.lora
    out = [
        f"LoRA r={lo_cfg.r} ({lo_cfg.target_modules}): {t:,} adapter parameters train of {params:,} "
        f"({100 * t / params:.2f}%); the base is frozen, the live reference is the base with adapters off",
        choice.reason,
        "  memory per GPU with LoRA (bf16): "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in items.items())
        + f"; total {sum(items.values()) / GIB:.2f} GiB (full parameters, ZeRO-2: {sum(full.values()) / GIB:.2f} GiB)",
        f"  FLOPs per token: {lo / 1e9:.1f} GFLOP with LoRA vs {hi / 1e9:.1f} GFLOP full-parameter "
        f"({lo / hi:.2f}x){'; reference forward included' if live else ''}",
        "  (the sections below model full-parameter training of the same recipe)",
    ]
    return out
