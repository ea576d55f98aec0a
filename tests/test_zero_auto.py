"""deepspeed.config=auto: ZeRO-2 where the model states fit whole, ZeRO-3 where they do not."""

from pathlib import Path

import pytest

from fpo_ds import config as C
from fpo_ds import ds_config, zero_auto

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def _recipe(**over):
    args = [f"{k}={v}" for k, v in over.items()]
    return C.load(str(ROOT / "recipes" / "tiny.yaml"), ["deepspeed.config=auto", *args])


def test_small_model_gets_zero2_with_buckets_capped_at_its_size():
    facts = zero_auto.ModelFacts(params=6_500_000, hidden=256, layers=8, vocab=384)
    choice = zero_auto.choose(_recipe(), facts, world=2, memory_bytes=12 * GIB, bf16=False)
    zero = choice.systems["zero_optimization"]
    assert zero["stage"] == 2 and "bf16" not in choice.systems
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 6_500_000
    assert "ZeRO-2" in choice.reason and "fp32" in choice.reason


def test_model_whose_states_do_not_fit_gets_zero3():
    # 9B in bf16 on 8 x 24 GiB: weights + gradients alone are 34 GiB per rank under ZeRO-2
    facts = zero_auto.ModelFacts(params=9_000_000_000, hidden=3584, layers=42, vocab=256000)
    choice = zero_auto.choose(_recipe(), facts, world=8, memory_bytes=24 * GIB, bf16=True)
    zero = choice.systems["zero_optimization"]
    assert zero["stage"] == 3 and choice.systems["bf16"] == {"enabled": True}
    assert zero["reduce_bucket_size"] == 500_000_000 and "allgather_bucket_size" not in zero
    # the arithmetic the module documents: 2 + 2 bytes whole, 12 bytes over 8 ranks, then the rest
    items = zero_auto.zero2_bytes(_recipe(), facts, 8, 2)
    assert items["weights"] == items["gradients"] == 18_000_000_000
    assert items["optimizer"] == 12 * 9_000_000_000 // 8


def test_live_reference_counts_and_offline_does_not():
    facts = zero_auto.ModelFacts(params=1_000_000, hidden=64, layers=4, vocab=384)
    live = zero_auto.zero2_bytes(_recipe(**{"loss.method": "dpo"}), facts, 2, 4)
    simpo = zero_auto.zero2_bytes(_recipe(**{"loss.method": "simpo"}), facts, 2, 4)
    assert live["reference"] == 4_000_000 and "reference" not in simpo


def test_auto_systems_get_the_batch_keys():
    choice = zero_auto.choose(_recipe(), zero_auto.ModelFacts(1000, 8, 1, 16), 2, GIB, False)
    cfg = ds_config.build(ds_config.AUTO, 8, 2, 2, choice.systems)
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["zero_optimization"]["stage"] == 2


def test_model_facts_count_the_parameters_without_loading_weights(world):
    from transformers import AutoModelForCausalLM

    recipe = _recipe(**{"model.name_or_path": str(world / "model")})
    facts = zero_auto.model_facts(recipe.model)
    model = AutoModelForCausalLM.from_pretrained(world / "model")
    assert facts.params == sum(p.numel() for p in model.parameters())
    assert facts.hidden == model.config.hidden_size and facts.vocab == model.config.vocab_size


@pytest.mark.parametrize("accelerator", ["cpu"])
def test_rank_memory_splits_the_host_between_local_ranks(accelerator):
    assert zero_auto.rank_memory(accelerator, 2) * 2 == pytest.approx(zero_auto.rank_memory(accelerator, 1), rel=1e-6)
