"""The bench's real-shape mode: long pairs that fill --seq, and the report comparing two checkouts."""

from fpo_ds import data
from fpo_ds.tools import bench


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
