"""The bench's real-shape mode: long pairs that fill --seq, and the report comparing two checkouts."""

from pathlib import Path

import pytest

from fpo_ds import data
from fpo_ds.tools.benchmarks import bench


def test_long_rows_fill_the_sequence_after_truncation(tokenizer):
    rows = bench.long_rows(3, 128, seed=0)
    assert len(rows) == 3 and all(r["chosen"] != r["rejected"] for r in rows)
    pairs, bad = data.build_pairs(rows, tokenizer, 128, 64, "fail", "bench")
    assert not bad
    for p in pairs:  # prompt cut to half the length, responses to the rest: every pair is exactly 128 wide
        assert len(p.prompt_ids) == 64 and len(p.chosen_ids) == len(p.rejected_ids) == 64
        assert data.padded_length(p) == 128


def test_compare_table_reports_ratios_and_loss_gap():
    row = {
        "step_time_s": ([1.0, 3.0], [2.0, 4.0]),
        "peak_mem_mib": ([100.0, 100.0], [400.0, 400.0]),
        "vocab_mem_mib": ([10.0, 10.0], [50.0, 70.0]),
        "max_loss_diff": 1e-7,
    }
    lines = bench._compare_table({"simpo": row}, "/somewhere/old")
    assert "This checkout vs old" in lines[1]
    cells = [c.strip() for c in lines[-1].split("|")[1:-1]]
    assert cells[0] == "simpo"
    assert cells[2] == "0.625 [0.500, 0.750]"  # step time this / other, per repeat
    assert cells[4] == "0.250 [0.250, 0.250]"  # peak memory this / other
    assert cells[6] == "6.000 [5.000, 7.000]"  # vocabulary-dependent memory other / this
    assert cells[7] == "1.00e-07"


def test_against_trl_options_and_table():
    from fpo_ds.tools.benchmarks import bench_trl

    args = bench_trl.parse(["--against", "trl", "--repeats", "2", "--models", "tiny", "--with-auto"])
    assert args.repeats == 2 and args.models == ["tiny"] and args.nprocs == [1, 2]
    assert args.variants == [*bench_trl.VARIANTS, "auto"]  # deepspeed.config values, auto last
    run = lambda t, rss, launch, loss: {  # noqa: E731
        "step_time_s": t,
        "peak_rss_mib": rss,
        "launch_to_step1_s": launch,
        "losses": [0.69, loss],
    }
    cell = {
        "model": "tiny",
        "params": 184_000,
        "procs": 2,
        "same_token_ids": True,
        "runs": {
            "zero3_fp32": [run(0.2, 600.0, 20.0, 0.5), run(0.3, 600.0, 30.0, 0.5)],
            "zero2_fp32": [run(0.1, 500.0, 10.0, 0.5), run(0.1, 500.0, 10.0, 0.5)],
            "trl": [run(0.1, 500.0, 10.0, 0.5 + 1e-7), run(0.1, 400.0, 10.0, 0.5)],
        },
    }
    assert bench_trl.ratios(cell, "zero3_fp32", "step_time_s") == pytest.approx([2.0, 3.0])  # repeat by repeat
    config = {"trl": "1.16.0", "steps": 30, "micro": 4, "warmup": 5, "repeats": 2}
    config["variants"] = bench_trl.VARIANTS
    md = bench_trl.markdown({"command": "fpo-ds bench --against trl", "config": config, "cells": [cell]})
    lines = md.splitlines()
    assert "`fpo-ds bench --against trl`" in lines
    head = next(x for x in lines if x.startswith("| model | procs | fpo-ds"))
    assert head.count("/ TRL") == 6  # step, RSS and launch -> step 1 for each of the two variants
    row = [c.strip() for c in next(x for x in lines if x.startswith("| tiny (0.18M) | 2 |")).split("|")[1:-1]]
    assert row[2] == "2.500 [2.000, 3.000]"  # ZeRO-3 step / TRL
    assert row[3] == "1.000 [1.000, 1.000]"  # ZeRO-2 step / TRL
    assert row[4] == "1.350 [1.200, 1.500]"  # ZeRO-3 RSS / TRL
    assert "| tiny | 2 | zero3_fp32 | 0.250 [0.200, 0.300] |" in md and "| 1.0e-07 |" in md
    assert "equal fpo-ds's: yes" in md


def test_bench_hands_against_trl_to_its_own_parser(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--against", "trl", "--models", "huge"])
    assert (
        e.value.code == 2 and "fpo-ds bench --against trl: error: --models: unknown ['huge']" in capsys.readouterr().err
    )


def test_against_trl_lora_row_trains_the_same_adapters_on_both_sides():
    from fpo_ds import config as C
    from fpo_ds.tools.benchmarks import bench_trl

    args = bench_trl.parse(["--against", "trl", "--lora", "16", "--variant", "auto"])
    assert args.lora == 16 and args.variants == ["auto"]
    recipe = C.load(bench_trl.RECIPE, bench_trl.fpo_ds_overrides(Path("w"), Path("r"), "auto", args, 2))
    assert recipe.model.lora == C.LoRAConfig(**bench_trl.lora_block(16))  # what TRL's PEFT config is built from
    assert recipe.model.lora.r == 16 and recipe.model.lora.alpha == 32.0
    config = {"trl": "1.16.0", "steps": 30, "micro": 4, "warmup": 5, "repeats": 1, "variants": ["auto"], "lora": 16}
    md = bench_trl.markdown({"command": "fpo-ds bench --against trl --lora 16", "config": config, "cells": []})
    assert "DPO with LoRA r=16 (all-linear, alpha 32; TRL + PEFT)" in md and "adapters off" in md
