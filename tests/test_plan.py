"""The memory planner's arithmetic (its calibration against measured GPU peaks: bench/calibrate_plan.py)."""

import pytest

from fpo_ds import config as C
from fpo_ds.tools import plan

NUMS = {"params": 2_600_000_000, "largest_layer": 590_000_000, "hidden": 2304, "layers": 26, "vocab": 256_000}


def _recipe(ds: str, method: str = "fpo", checkpointing: bool = True) -> C.Recipe:
    return C.from_dict(
        {
            "model": {"name_or_path": "x", "gradient_checkpointing": checkpointing},
            "data": {"path": "x", "max_length": 1024, "max_prompt_length": 512},
            "loss": {"method": method},
            "sae": {"path": "x"},
            "cache": {"dir": "x"},
            "train": {"micro_batch_size": 2, "global_batch_size": 32},
            "deepspeed": {"config": f"ds_configs/{ds}"},
        }
    )


def test_offload_moves_model_states_to_the_host_and_zero2_is_refused():
    on_gpu = plan.estimate(_recipe("zero3_bf16.json"), NUMS, 1, 8, d_sae=16384)
    offload = plan.estimate(_recipe("zero3_offload_bf16.json"), NUMS, 1, 8, d_sae=16384)
    assert offload["model_states"] < on_gpu["model_states"] and offload["zero_buffers"] < on_gpu["zero_buffers"]
    assert offload["host_model_states_per_node"] > 0 and "host_model_states_per_node" not in on_gpu
    assert on_gpu["sae_shard"] == 2304 * 2048 * 4 and on_gpu["sae_encode"] > 0
    with pytest.raises(ValueError, match="ZeRO stage 2; fpo-ds plan models ZeRO-3"):
        plan.estimate(_recipe("zero2_bf16.json"), NUMS, 1, 8)


def test_checkpointing_and_a_live_reference_change_the_estimate_as_they_should():
    ckpt = plan.estimate(_recipe("zero3_bf16.json", "dpo"), NUMS, 1, 8)
    full = plan.estimate(_recipe("zero3_bf16.json", "dpo", checkpointing=False), NUMS, 1, 8)
    assert full["activations"] > 5 * ckpt["activations"]
    live = plan.estimate(_recipe("zero3_bf16.json", "tdpo2"), NUMS, 1, 8)
    assert "reference" in live and "reference" not in plan.estimate(_recipe("zero3_bf16.json", "simpo"), NUMS, 1, 8)
    assert any("does NOT fit" in line for line in plan.advice(full, _recipe("zero3_bf16.json"), 8 * 2**30))
