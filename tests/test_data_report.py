"""`fpo-ds data`: rows per source, drops, length percentiles, truncation, padding, rendered pairs."""

import json
import re

from fpo_ds import cli


def test_data_report_on_the_tiny_recipe_shows_lengths_and_two_rendered_pairs(world, tmp_path, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    rows = [json.loads(x) for x in (world / "data" / "train.jsonl").read_text().splitlines()]
    rows[3] = dict(rows[3], rejected=rows[3]["chosen"])  # dropped: identical_responses
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = [
        "data.eval_fraction=0.25",
        f"model.name_or_path={world / 'model'}",
        f"data.path={path}",
        "data.max_length=18",
        "data.max_prompt_length=12",
    ]
    assert cli.main(["data", "recipes/tiny.yaml", *over, "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{path} [train] less the held-out 0.25: 64 rows read, 48 selected, 47 kept" in out
    assert f"held-out: 16 pairs of {path} [train, held-out 0.25] (0 rows dropped)" in out
    assert re.search(r"dropped \[identical_responses\]: 1 row\(s\), e.g. row ids \[\d+\]", out)
    assert "p50     p90     p99     max" in out and "prompt          12      12      12      12" in out
    assert "truncated: 47 of 47 pairs (100.0%)" in out  # prompts of 15 tokens cut to 12
    assert "padding: " in out and "under micro-batch 2 x world 1" in out
    assert out.count("--- row ") == 2 and out.count("tokens in the loss]") == 4
    assert "<start_of_turn>model\n«" in out  # the loss starts right after the generation prompt
