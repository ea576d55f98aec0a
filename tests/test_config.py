"""Recipes -> frozen config tree: strict keys, types, choices, overrides, every shipped recipe."""

from pathlib import Path

import pytest
import yaml

from fpo_ds import config as C
from fpo_ds.sae import registry_problems

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
MINIMAL = {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}, "loss": {"method": "dpo"}}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    r = C.load(path)
    assert r.model.name_or_path and r.train.global_batch_size % r.train.micro_batch_size == 0
    if r.sae.release:
        assert registry_problems(r.sae.release, r.sae.sae_id) == []
    assert (Path(__file__).parent.parent / r.deepspeed.config).is_file()


def test_five_planted_mistakes_reported_at_once(tmp_path):
    raw = {
        "model": {"name_or_path": "m"},
        "data": {"path": "d.jsonl", "max_lenght": 512},  # 1 misspelled key
        "loss": {"method": "dpoo", "betta": 0.1},  # 2 bad choice, 3 misspelled key
        "train": {"lr": "fast", "micro_batch_size": 2.5},  # 4 wrong type, 5 wrong type
    }
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(C.ConfigError) as e:
        C.load(p)
    msg = str(e.value)
    assert len(e.value.problems) == 5 and str(p) in msg
    assert "data.max_lenght: unknown key (did you mean data.max_length?)" in msg
    assert "loss.method: 'dpoo' is not one of" in msg and "did you mean 'dpo'" in msg
    assert "loss.betta: unknown key (did you mean loss.beta?)" in msg
    assert "train.lr: expected a number, got 'fast'" in msg
    assert "train.micro_batch_size: expected an integer, got 2.5" in msg


def test_missing_required_and_unknown_section():
    with pytest.raises(C.ConfigError) as e:
        C.from_dict({"data": {}, "modle": {}})
    assert set(e.value.problems) >= {
        "modle: unknown key (did you mean model?)",
        "model.name_or_path: required key is missing",
        "data.path: required key is missing (or list sources under data.mix)",
    }


def test_scientific_notation_string_becomes_float_and_tree_is_frozen():
    r = C.from_dict({**MINIMAL, "train": {"lr": "2e-5"}})
    assert r.train.lr == 2e-5 and isinstance(r.train.lr, float)
    with pytest.raises(AttributeError):
        r.train.lr = 1.0  # type: ignore[misc]


def test_overrides_apply_and_are_validated(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(MINIMAL))
    r = C.load(p, ["train.lr=1e-6", "loss.beta=0.2", "output.dir=/x/y", "data.max_samples=null"])
    assert (r.train.lr, r.loss.beta, r.output.dir, r.data.max_samples) == (1e-6, 0.2, "/x/y", None)
    with pytest.raises(C.ConfigError, match="train.lrr: unknown key"):
        C.load(p, ["train.lrr=1"])
    with pytest.raises(C.ConfigError, match="expected key=value"):
        C.load(p, ["train.lr"])


def test_cross_field_rules():
    with pytest.raises(C.ConfigError) as e:
        C.from_dict(
            {
                **MINIMAL,
                "loss": {"method": "fpo"},
                "train": {"global_batch_size": 10, "micro_batch_size": 4},
                "data": {"path": "d", "max_length": 64, "max_prompt_length": 64},
            }
        )
    msg = str(e.value)
    assert "global_batch_size=10 is not a multiple of train.micro_batch_size=4" in msg
    assert "sae: method fpo needs an SAE" in msg and "cache.dir: method fpo needs" in msg
    assert "data.max_prompt_length: 64 must be < data.max_length (64)" in msg


def test_beta_defaults_follow_the_paper():
    assert C.from_dict({**MINIMAL, "loss": {"method": "simpo"}}).loss.resolved_beta == 2.0
    assert C.from_dict(MINIMAL).loss.resolved_beta == 0.1


def test_resolved_recipe_round_trips(tmp_path):
    r = C.from_dict({**MINIMAL, "train": {"adam_betas": [0.9, 0.95]}})
    C.dump(r, tmp_path / "resolved.yaml")
    assert C.load(tmp_path / "resolved.yaml") == r


def test_sae_registry_check_offline():
    assert registry_problems("gemma-scope-2b-pt-res", "layer_25/width_16k/average_l0_55") == []
    assert "did you mean gemma-scope-2b-pt-res" in registry_problems("gemma-scope-2b-pt-re", "x")[0]
    assert "sae.sae_id" in registry_problems("gemma-scope-2b-pt-res", "layer_99/width_16k/average_l0_55")[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=0", "train.max_steps: must be >= 1, got 0 (use null for whole epochs)"),
        ("train.max_steps=-5", "train.max_steps: must be >= 1, got -5"),
        ("logging.every=0", "logging.every: must be >= 1"),
        ("deepspeed.timeout_minutes=0", "deepspeed.timeout_minutes: must be >= 1"),
        ("train.lr=.nan", "train.lr: must be a finite number > 0, got nan"),
        ("train.lr=.inf", "train.lr: must be a finite number > 0, got inf"),
        ("train.adam_betas=[0.9,1.5]", "train.adam_betas: each must be in [0, 1), got [0.9, 1.5]"),
        ("loss.beta=0", "loss.beta: must be a finite number > 0, got 0.0"),
        ("sae.k=0", "sae.k: must be >= 1, got 0"),
        ("output.keep_last=0", "output.keep_last: must be >= 1"),
        ("sae.shard_group=nodes", "sae.shard_group: 'nodes' is not node, world, none or a rank count"),
        ("train.eval_every=5", "train.eval_every=5 needs held-out pairs: set data.eval_split"),
        ("data.eval_fraction=0.9", "data.eval_fraction: must be in (0, 0.5], got 0.9"),
        ("train.optimizer=sgd", "train.optimizer"),
        ("train.rmsprop_alpha=1.0", "train.rmsprop_alpha: must be in [0, 1), got 1.0"),
    ],
)
def test_values_training_would_refuse_are_refused_at_load(tmp_path, override, message):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(C.ConfigError) as e:
        C.load(p, [override])
    assert message in str(e.value), str(e.value)


def test_one_method_list():
    """The recipe's method names (LossConfig.method) are the objective's table and the beta defaults, no more."""
    import typing

    from fpo_ds import objective

    names = set(typing.get_args(typing.get_type_hints(C.LossConfig)["method"]))
    assert len(names) == 7 and names == set(C.METHOD_NEEDS) == set(C.DEFAULT_BETA)
    for m in sorted(names):  # every name builds an objective that carries the table's needs
        obj, loss = objective.build(C.LossConfig(method=m)), C.LossConfig(method=m)
        assert (obj.ref_kind, obj.needs_kl, obj.needs_features) == (loss.ref_kind, loss.needs_kl, loss.needs_features)
    assert [m for m in sorted(names) if C.LossConfig(method=m).needs_features] == ["fpo"]
