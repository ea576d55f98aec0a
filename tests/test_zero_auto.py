"""deepspeed.config=auto: no ZeRO while every state fits whole, ZeRO-2 while the partitioned ones fit, else ZeRO-3."""

from pathlib import Path

import pytest

from fpo_ds import config as C
from fpo_ds import ds_config, zero_auto

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def _recipe(**over):
    args = [f"{k}={v}" for k, v in over.items()]
    return C.load(str(ROOT / "recipes" / "tiny.yaml"), ["deepspeed.config=auto", *args])


def test_small_model_gets_plain_data_parallel():
    facts = zero_auto.ModelFacts(params=6_500_000, hidden=256, layers=8, vocab=384)
    choice = zero_auto.choose(_recipe(), facts, world=2, memory_bytes=12 * GIB, bf16=False)
    assert choice.systems["zero_optimization"] == {"stage": 0} and "bf16" not in choice.systems
    assert "stage 0" in choice.reason and "fp32" in choice.reason


def test_zero2_when_only_the_partitioned_optimizer_fits():
    # 1B in bf16 on 8 ranks of 24 GiB: whole, 2 + 2 + 12 bytes/param = 16 GB > 80%; under ZeRO-2, 5.5 GB
    facts = zero_auto.ModelFacts(params=1_000_000_000, hidden=2048, layers=16, vocab=32000)
    recipe = _recipe(**{"loss.method": "simpo"})
    whole = sum(zero_auto.rank_bytes(recipe, facts, 8, 2, 0).values())
    assert whole > 0.8 * 18 * GIB
    choice = zero_auto.choose(recipe, facts, world=8, memory_bytes=18 * GIB, bf16=True)
    zero = choice.systems["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 500_000_000
    assert choice.systems["bf16"] == {"enabled": True} and "ZeRO-2" in choice.reason


def test_model_whose_states_do_not_fit_gets_zero3():
    # 9B in bf16 on 8 x 24 GiB: weights + gradients alone are 34 GiB per rank under ZeRO-2
    facts = zero_auto.ModelFacts(params=9_000_000_000, hidden=3584, layers=42, vocab=256000)
    choice = zero_auto.choose(_recipe(), facts, world=8, memory_bytes=24 * GIB, bf16=True)
    zero = choice.systems["zero_optimization"]
    assert zero["stage"] == 3 and choice.systems["bf16"] == {"enabled": True}
    assert zero["reduce_bucket_size"] == 500_000_000 and "allgather_bucket_size" not in zero
    # the arithmetic the module documents: 2 + 2 bytes whole, 12 bytes over 8 ranks under ZeRO-2, whole at 0
    items = zero_auto.rank_bytes(_recipe(), facts, 8, 2, 2)
    assert items["weights"] == items["gradients"] == 18_000_000_000
    assert items["optimizer"] == 12 * 9_000_000_000 // 8
    assert zero_auto.rank_bytes(_recipe(), facts, 8, 2, 0)["optimizer"] == 12 * 9_000_000_000


def test_live_reference_counts_and_offline_does_not():
    facts = zero_auto.ModelFacts(params=1_000_000, hidden=64, layers=4, vocab=384)
    live = zero_auto.rank_bytes(_recipe(**{"loss.method": "dpo"}), facts, 2, 4, 2)
    simpo = zero_auto.rank_bytes(_recipe(**{"loss.method": "simpo"}), facts, 2, 4, 2)
    assert live["reference"] == 4_000_000 and "reference" not in simpo


def test_auto_systems_get_the_batch_keys():
    choice = zero_auto.choose(_recipe(), zero_auto.ModelFacts(1000, 8, 1, 16), 2, GIB, False)
    cfg = ds_config.build(ds_config.AUTO, 8, 2, 2, choice.systems)
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["zero_optimization"]["stage"] == 0


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
