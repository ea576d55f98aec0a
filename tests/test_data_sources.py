"""Data settings refused at load, sources of every kind, mixtures, and the tokenized cache's integrity."""

import json
from pathlib import Path

import pytest

from fpo_ds import cli
from fpo_ds import config as C
from fpo_ds import data as D
from fpo_ds import tokenized as T

ROWS = [{"prompt": f"Repeat: {i} {i + 1}", "chosen": f"{i} {i + 1}", "rejected": f"{i + 1} {i}"} for i in range(12)]


def _jsonl(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _problems(**data) -> list[str]:
    raw = {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl", **data}, "loss": {"method": "dpo"}}
    with pytest.raises(C.ConfigError) as e:
        C.from_dict(raw)
    return e.value.problems


@pytest.mark.parametrize(
    "data,match",
    [
        ({"max_samples": 0}, "data.max_samples: must be >= 1, got 0"),
        ({"max_samples": -3}, "data.max_samples: must be >= 1, got -3"),
        ({"max_prompt_length": 0}, "data.max_prompt_length: must be >= 1, got 0"),
        ({"max_prompt_length": -1}, "data.max_prompt_length: must be >= 1, got -1"),
        ({"max_prompt_length": 64, "max_length": 64}, "data.max_prompt_length: 64 must be < data.max_length"),
        ({"split": "train", "eval_split": "train"}, "data.eval_split: 'train' is the training split"),
        ({"format": "sft_messages"}, "data.format: sft_messages rows have no rejected response"),
        ({"format": "hh"}, "data.format: 'hh' is not one of"),
        ({"mix": [{"path": "a.jsonl", "weight": 1, "count": 3}]}, "data.path / data.mix: set one"),
        ({"mix": [{"path": "a.jsonl", "weight": 1, "count": 3}]}, r"data.mix\[0\]: set one of weight .* not both"),
        ({"mix": [{"path": "a.jsonl", "weight": -1}]}, r"data.mix\[0\].weight: must be a finite number > 0"),
        ({"mix": [{"split": "x", "count": 2}]}, r"data.mix\[0\].path: required key is missing"),
    ],
)
def test_bad_data_settings_are_refused_at_load_naming_the_key(data, match):
    import re

    assert any(re.search(match, p) for p in _problems(**data)), _problems(**data)


def _validate(tmp_path, capsys, path, *overrides) -> tuple[int, str]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: m}}\ndata: {{path: {path}}}\nloss: {{method: dpo}}\n")
    code = cli.main(["validate", str(recipe), *overrides])
    return code, capsys.readouterr().err


def test_validate_refuses_a_split_the_source_lacks_and_names_the_available(tmp_path, capsys):
    import datasets

    local = _jsonl(tmp_path / "d.jsonl")
    code, err = _validate(tmp_path, capsys, local, "data.max_samples=0", "data.max_prompt_length=-1")
    assert code == 1 and "data.max_samples: must be >= 1, got 0" in err and "data.max_prompt_length: must be" in err
    code, err = _validate(tmp_path, capsys, local, "data.eval_split=nosuch")
    assert code == 1 and "data.eval_split: " in err and "has no split 'nosuch'" in err and "['train']" in err
    saved = tmp_path / "saved"
    rows = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train_prefs": rows, "test_prefs": rows.select(range(4))}).save_to_disk(str(saved))
    code, err = _validate(tmp_path, capsys, saved, "data.split=train_prefs", "data.eval_split=test")
    assert code == 1 and "available: ['train_prefs', 'test_prefs']" in err
    code, err = _validate(tmp_path, capsys, saved, "data.split=train", "data.eval_split=test_prefs")
    assert code == 1 and "data.split: " in err and "has no split 'train'" in err
    assert _validate(tmp_path, capsys, saved, "data.split=train_prefs", "data.eval_split=test_prefs")[0] == 0
    # held-out pairs from another source (SFT on one set, held out on another's preferences)
    code, err = _validate(tmp_path, capsys, local, f"data.eval_path={saved}", "data.eval_split=train")
    assert code == 1 and "data.eval_split: " in err and f"{saved} has no split 'train'" in err
    assert _validate(tmp_path, capsys, local, f"data.eval_path={saved}", "data.eval_split=test_prefs")[0] == 0
    held = D.select(C.DataConfig(path=local, eval_path=str(saved), eval_split="test_prefs"), "eval")
    assert len(held[0].rows) == 4 and held[0].label == f"{saved} [test_prefs]"
    cfg = C.DataConfig(path=local, eval_split="nosuch")
    with pytest.raises(ValueError, match=r"data.eval_split: .* has no split 'nosuch'.*available: \['train'\]"):
        D.select(cfg, "eval")  # the same refusal at load time, whatever the source


def test_local_sources_csv_glob_and_saved_dataset(tmp_path, tokenizer):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.to_csv(str(tmp_path / "d.csv"))
    assert len(D.load_rows(str(tmp_path / "d.csv"), "train")) == 12
    (tmp_path / "shards").mkdir()
    for i in range(3):
        _jsonl(tmp_path / "shards" / f"part-{i}.jsonl", ROWS[4 * i : 4 * i + 4])
    rows = D.load_rows(str(tmp_path / "shards" / "*.jsonl"), "train")
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in ROWS]
    with pytest.raises(FileNotFoundError, match=r"data.path: the glob .* matches no file"):
        D.load_rows(str(tmp_path / "none-*.jsonl"), "train")
    ds.save_to_disk(str(tmp_path / "one"))
    assert len(D.load_rows(str(tmp_path / "one"), "train")) == 12
    with pytest.raises(ValueError, match=r"has no split 'test'.*available: \['train'\]"):
        D.load_rows(str(tmp_path / "one"), "test")


def _fake_hub_cache(cache, tmp_path, repo="someorg/prefs", config="default"):
    """A datasets cache holding hub data set `repo` as `load_dataset` leaves it after a download."""
    import datasets

    files = {"train_prefs": _jsonl(tmp_path / "tr.jsonl"), "test_prefs": _jsonl(tmp_path / "te.jsonl", ROWS[:4])}
    builder = datasets.load_dataset_builder("json", data_files=files, cache_dir=str(tmp_path / "build"))
    builder.download_and_prepare()
    name = repo.split("/")[1]
    target = cache / repo.replace("/", "___") / config / "0.0.0" / "0123456789abcdef"
    target.mkdir(parents=True)
    for f in Path(builder.cache_dir).iterdir():
        if f.suffix == ".arrow":
            (target / f.name.replace("json-", f"{name}-")).write_bytes(f.read_bytes())
    info = json.loads((Path(builder.cache_dir) / "dataset_info.json").read_text())
    info.update(config_name=config, dataset_name=name, builder_name="json")
    (target / "dataset_info.json").write_text(json.dumps(info))


def test_hub_id_loads_through_datasets_from_a_local_cache_offline(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "hf-datasets"
    _fake_hub_cache(cache, tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    assert datasets.config.HF_HUB_OFFLINE  # set by conftest: nothing is downloaded
    assert len(D.load_rows("someorg/prefs", "train_prefs")) == 12
    assert len(D.load_rows("someorg/prefs", "test_prefs", name="default")) == 4
    with pytest.raises(ValueError, match=r"data.split: someorg/prefs has no split 'train'.*test_prefs"):
        D.load_rows("someorg/prefs", "train")


def test_mixture_is_seeded_counts_and_weights_and_holds_out_per_source(tmp_path):
    a, b = _jsonl(tmp_path / "a.jsonl"), _jsonl(tmp_path / "b.jsonl", ROWS[:6])
    mix = [C.MixSource(path=a, weight=2.0), C.MixSource(path=b, weight=1.0)]
    cfg = C.DataConfig(mix=mix, seed=3)
    # weights 2:1, scarcest source b (6 rows) allows 6 * 3/1 = 18 in all: 12 from a, 6 from b
    assert [len(s.rows) for s in D.select(cfg)] == [12, 6]
    capped = C.DataConfig(mix=mix, seed=3, max_samples=9)
    assert [len(s.rows) for s in D.select(capped)] == [6, 3]  # data.max_samples caps the total, shares kept
    counted = C.DataConfig(mix=[C.MixSource(path=a, count=5), C.MixSource(path=b, count=9)], seed=3)
    sel = D.select(counted)
    assert [len(s.rows) for s in sel] == [5, 9]  # 9 of 6 rows: each once, then 3 again
    again = D.select(counted)
    assert [s.rows["prompt"] for s in sel] == [s.rows["prompt"] for s in again]
    other = D.select(C.DataConfig(mix=counted.mix, seed=4))
    assert [s.rows["prompt"] for s in other] != [s.rows["prompt"] for s in sel]  # the seed picks the rows
    held = C.DataConfig(mix=counted.mix, seed=3, eval_fraction=0.25)
    train, ev = D.select(held, "train"), D.select(held, "eval")
    for t, e in zip(train, ev):
        assert not set(t.rows["prompt"]) & set(e.rows["prompt"])  # disjoint per source
    # held out: a 3 of 12, b 2 of 6; each cut to a quarter of what the mix trains on (5/3 -> 2, 9/3 -> 3)
    assert [len(e.rows) for e in ev] == [2, 2]


def test_tokenized_cache_checks_itself_names_damage_and_rebuilds(tmp_path, tokenizer, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    cfg = C.DataConfig(path=_jsonl(tmp_path / "d.jsonl"), max_length=48, max_prompt_length=24)
    lines = []
    pairs, fp = D.load_pairs(cfg, tokenizer, log=lines.append)
    (directory,) = (tmp_path / "cache" / "fpo_ds-tokenized").iterdir()
    manifest = json.loads((directory / T.MANIFEST).read_text())
    assert manifest["rows"] == 12 and manifest["files"] and manifest["key"][0] == T.FORMAT
    arrow = next(directory.glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flipped bytes, same size
    arrow.write_bytes(bytes(data))
    lines.clear()
    assert D.load_pairs(cfg, tokenizer, log=lines.append)[0] == pairs
    assert any(f"the tokenized set is damaged: {arrow} does not match its checksum" in m for m in lines)
    arrow.write_bytes(arrow.read_bytes()[:100])  # truncated
    lines.clear()
    assert D.load_pairs(cfg, tokenizer, log=lines.append)[0] == pairs
    assert any("rebuilding" in m for m in lines)
    with pytest.raises(T.DamagedCache, match=r"token ids in \[\d+, \d+\], outside the tokenizer's vocabulary"):
        T.read(directory, 5)  # a set whose ids exceed the vocabulary is refused, naming the directory
    assert fp == D.load_pairs(cfg, tokenizer)[1]


def test_a_damaged_arrow_copy_of_a_data_file_is_rebuilt_from_the_file(tmp_path, tokenizer, monkeypatch, capsys):
    """The Arrow copy datasets keeps of a local file: a truncated one is rebuilt, not blamed on the file."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = _jsonl(tmp_path / "d.jsonl")
    rows = D.load_rows(path, "train")
    copies = [Path(f["filename"]) for f in rows.cache_files]
    assert copies and all(tmp_path / "cache" in c.parents for c in copies)
    for c in copies:
        c.write_bytes(c.read_bytes()[:100])
    again = D.load_rows(path, "train")
    assert again.to_list() == ROWS
    assert "datasets' cached Arrow copy of" in capsys.readouterr().out
    Path(path).write_text("{not json\n")  # a broken file stays the file's error
    with pytest.raises(ValueError, match="line 1: invalid JSON"):
        D.load_rows(path, "train")


def test_fingerprint_follows_the_content_not_the_path_or_modification_time(tmp_path, tokenizer, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    fp = lambda path: D.load_pairs(C.DataConfig(path=path, max_length=48, max_prompt_length=24), tokenizer)[1]  # noqa: E731
    original = fp(_jsonl(tmp_path / "d.jsonl"))
    (tmp_path / "scratch").mkdir()
    staged = _jsonl(tmp_path / "scratch" / "copy.jsonl")  # the same rows staged elsewhere, a new mtime
    assert fp(staged) == original
    assert fp(_jsonl(tmp_path / "scratch" / "copy.jsonl", ROWS[:-1])) != original  # one row fewer
    swapped = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) if i == 3 else r for i, r in enumerate(ROWS)]
    assert fp(_jsonl(tmp_path / "scratch" / "copy.jsonl", swapped)) != original  # one pair's sides swapped
