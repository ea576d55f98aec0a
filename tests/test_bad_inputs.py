"""Bad input of every kind gets one clear paragraph naming the file/key/row and the fix.

Property-based tests (hypothesis) check that the config loader and the data pipeline never fail
any other way.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpo_ds import config as C
from fpo_ds import data as D
from fpo_ds import ds_config
from fpo_ds import model as M
from fpo_ds.data import IGNORE_INDEX
from fpo_ds.sae import check_against_model, load_sae
from fpo_ds.tools.demo import toy

ROOT = Path(__file__).resolve().parent.parent


def test_batch_arithmetic_error_shows_its_arithmetic():
    with pytest.raises(
        ValueError,
        match=r"global_batch_size=64 is not a multiple of micro_batch_size\*world_size = "
        r"2\*24 = 48",
    ):
        ds_config.accumulation_steps(64, 2, 24)


def test_deepspeed_json_with_batch_keys_or_missing_is_refused(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="sets \\['train_batch_size'\\].*Delete these keys"):
        ds_config.build(str(bad), 8, 1, 2)
    with pytest.raises(FileNotFoundError, match="deepspeed.config: .*nope.json not found.*zero3_bf16.json"):
        ds_config.build(str(tmp_path / "nope.json"), 8, 1, 2)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ds_config.build(str(bad), 8, 1, 2)


def test_sae_that_cannot_read_the_model(world):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(world / "model")
    with pytest.raises(ValueError, match="SAE d_in 32 != model hidden_size 64"):
        check_against_model(toy.random_sae("jumprelu", 32, 16, 1), cfg)
    with pytest.raises(ValueError, match="SAE layer 7 is beyond the model's 4 blocks"):
        check_against_model(toy.random_sae("jumprelu", 64, 16, 7), cfg)
    sae = toy.random_sae("jumprelu", 64, 16, 1)
    sae.cfg.metadata.hook_name = "blocks.1.hook_mlp_out"
    with pytest.raises(ValueError, match="not a residual-stream site"):
        check_against_model(sae, cfg)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.name_or_path: /no/such/model does not exist.*fpo-ds toy"):
        M.check_model_path("/no/such/model")  # the fix is named: another path, or how the tiny world is made
    with pytest.raises(FileNotFoundError, match="data.path: .*nope.jsonl does not exist.*pass data.path="):
        D.load_rows(str(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        M.check_model_path(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="sae.path: .* has no cfg.json"):
        load_sae(str(tmp_path))


def _write(tmp_path, name, content: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


GOOD = b'{"prompt": "Repeat: 1 2", "chosen": "1 2", "rejected": "2 1"}\n'


@pytest.mark.parametrize(
    "content,match",
    [
        (GOOD + b"{bad json\n", r"line 2: invalid JSON"),
        (GOOD + b'{"prompt": "a\xff", "chosen": "b", "rejected": "c"}\n', r"line 2: not UTF-8"),
        (GOOD + b"[1, 2]\n", r"line 2: not a JSON object"),
        (b"", r"is empty"),
    ],
)
def test_malformed_data_files(tmp_path, content, match):
    with pytest.raises(ValueError, match=f"data.path: .*{match}"):
        D.load_rows(_write(tmp_path, "d.jsonl", content), "train")


def test_wrong_types_prompt_only_and_huge_rows(tmp_path, tokenizer):
    rows = [
        {"prompt": 7, "chosen": "a", "rejected": "b"},
        {"prompt": "only a prompt"},
        {"prompt": "Repeat: 1", "chosen": "1 " * 50_000, "rejected": "2"},  # huge: truncated, kept
        {"prompt": "Repeat: 1", "chosen": ["x"], "rejected": "b"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, bad = D.build_pairs(D.load_rows(str(path), "train"), tokenizer, 64, 32, "drop", str(path))
    assert bad == {"non_string_prompt": [0], "missing_field": [1], "malformed_messages": [3]}
    assert [p.example_id for p in pairs] == [2] and len(pairs[0].prompt_ids) + len(pairs[0].chosen_ids) <= 64


def test_entry_point_prints_a_paragraph_not_a_traceback(tmp_path, world):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(world / "model")},
                "data": {"path": _write(tmp_path, "d.jsonl", GOOD + b"{oops\n")},
                "loss": {"method": "simpo"},
                "deepspeed": {"config": str(ROOT / "ds_configs/zero3_fp32.json")},
                "output": {"dir": str(tmp_path / "run")},  # not runs/default in the checkout
            }
        )
    )
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", MASTER_PORT="29791")
    proc = subprocess.run(
        [sys.executable, "-m", "fpo_ds.train", str(recipe)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "FAILED: ValueError: data.path:" in proc.stderr and "line 2: invalid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    v = subprocess.run(
        [sys.executable, "-m", "fpo_ds.cli", "validate", str(recipe), "train.lr=fast", "loss.bta=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert v.returncode == 1 and "train.lr: expected a number" in v.stderr and "did you mean loss.beta" in v.stderr
    assert "Traceback" not in v.stderr


# ----------------------------------------------------------------------------- property-based

leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
)
known = {f.name: f for f in __import__("dataclasses").fields(C.Recipe)}
section = st.dictionaries(
    st.sampled_from(
        [
            "beta",
            "lr",
            "method",
            "path",
            "name_or_path",
            "max_length",
            "k",
            "dir",
            "micro_batch_size",
            "global_batch_size",
            "resume",
            "bogus",
        ]
    ),
    leaf,
    max_size=5,
)
recipe_dicts = st.dictionaries(st.sampled_from(list(known) + ["extra"]), st.one_of(section, leaf), max_size=9)


@settings(max_examples=300, deadline=None)
@given(recipe_dicts)
def test_config_loader_only_ever_raises_config_error(raw):
    try:
        r = C.from_dict(raw)
    except C.ConfigError as e:
        assert e.problems and all(isinstance(p, str) for p in e.problems)
    else:
        assert isinstance(r, C.Recipe)


text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
value = st.one_of(
    st.none(), st.integers(), text, st.lists(st.fixed_dictionaries({"role": text, "content": text}), max_size=3)
)
rows = st.lists(st.fixed_dictionaries({}, optional={"prompt": value, "chosen": value, "rejected": value}), max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows)
def test_data_pipeline_drops_or_keeps_and_masks_only_responses(tokenizer, batch):
    try:
        pairs, bad = D.build_pairs(batch, tokenizer, 48, 24, "drop", "prop")
    except ValueError as e:
        assert "no usable preference pairs" in str(e)
        return
    assert len(pairs) + sum(len(v) for v in bad.values()) == len(batch)
    b = D.collate(pairs, tokenizer.pad_token_id)
    for i, p in enumerate(pairs):
        assert len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 48 and p.chosen_ids
        labels = b.labels[i].tolist()
        assert all(x == IGNORE_INDEX for x in labels[: len(p.prompt_ids)])
        assert labels[len(p.prompt_ids) : len(p.prompt_ids) + len(p.chosen_ids)] == p.chosen_ids


def test_relative_deepspeed_config_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.g. where a multi-node launcher starts the ranks
    cfg = ds_config.build("ds_configs/zero3_fp32.json", 8, 1, 2)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["gradient_accumulation_steps"] == 4
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero3_fp32.json").write_text('{"zero_optimization": {"stage": 2}}')
    assert ds_config.build("ds_configs/zero3_fp32.json", 8, 1, 2)["zero_optimization"]["stage"] == 2  # cwd wins


def test_cli_reports_bad_input_in_one_paragraph(capsys):
    from fpo_ds import cli

    assert cli.main(["plan", str(ROOT / "recipes/tiny.yaml"), "loss.method=fpo", "train.lr=fast"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fpo-ds plan: FAILED: ConfigError:") and "train.lr: expected a number" in err
    assert cli.main(["export", str(ROOT / "no-such-checkpoint"), "out"]) == 1
    assert "no-such-checkpoint" in capsys.readouterr().err
