"""Preference data: row shapes, bad rows, chat-template masks, truncation, order."""

import json

import pytest
import torch

from fpo_ds import data as D
from fpo_ds.data import IGNORE_INDEX

ROW = {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "The answer is 6."}
UF_ROW = {
    "prompt": "What is 2 + 3?",
    "chosen": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "The answer is 5."}],
    "rejected": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "The answer is 6."}],
    "score_chosen": 8.0,
}


def test_string_and_ultrafeedback_shapes_give_same_tokens(tokenizer):
    assert D.encode(tokenizer, ROW, 256, 128) == D.encode(tokenizer, UF_ROW, 256, 128)


def test_masks_token_by_token_on_chat_template(tokenizer):
    p, c, r = D.encode(tokenizer, ROW, 256, 128)
    assert tokenizer.decode(p) == "<bos><start_of_turn>user\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer.decode(c) == "The answer is 5.<end_of_turn>\n"
    assert tokenizer.decode(r) == "The answer is 6.<end_of_turn>\n"
    long_row = dict(ROW, rejected="The answer is 6, or maybe 7.")
    pairs, _ = D.build_pairs([ROW, long_row], tokenizer, 256, 128, "drop", "t")
    b = D.collate(pairs, tokenizer.pad_token_id)
    assert b.input_ids.shape[0] == 4 and b.example_ids.tolist() == [0, 1]
    for row_i, (pair, resp) in enumerate(
        [
            (pairs[0], pairs[0].chosen_ids),
            (pairs[1], pairs[1].chosen_ids),
            (pairs[0], pairs[0].rejected_ids),
            (pairs[1], pairs[1].rejected_ids),
        ]
    ):
        n_p, seq = len(pair.prompt_ids), pair.prompt_ids + resp
        labels, ids, att = b.labels[row_i].tolist(), b.input_ids[row_i].tolist(), b.attention_mask[row_i].tolist()
        for t in range(len(labels)):
            if t < n_p:  # prompt
                assert labels[t] == IGNORE_INDEX and ids[t] == seq[t] and att[t] == 1
            elif t < len(seq):  # response: label is the token itself
                assert labels[t] == seq[t] == ids[t] and att[t] == 1
            else:  # padding
                assert labels[t] == IGNORE_INDEX and ids[t] == tokenizer.pad_token_id and att[t] == 0


BAD = [
    ({"prompt": "q", "chosen": "a"}, "missing_field"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "non_string_response"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty_response"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical_responses"),
    ({"chosen": "a", "rejected": "b"}, "missing_field"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty_prompt"),
    (
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}],
        },
        "prompt_mismatch",
    ),
    ({"chosen": [{"role": "user"}], "rejected": [{"role": "assistant", "content": "b"}]}, "malformed_messages"),
]


@pytest.mark.parametrize("row,reason", BAD)
def test_each_bad_row_kind_is_dropped_and_counted(tokenizer, row, reason):
    pairs, bad = D.build_pairs([ROW, row, ROW], tokenizer, 256, 128, "drop", "t")
    assert [p.example_id for p in pairs] == [0, 2]
    assert bad == {reason: [1]}


def test_bad_row_fail_mode_names_row_and_fix(tokenizer):
    with pytest.raises(ValueError, match=r"mydata: row 1: identical_responses.*on_bad_row=drop"):
        D.build_pairs([ROW, BAD[3][0]], tokenizer, 256, 128, "fail", "mydata")


def test_drop_log_prints_counts_and_ids(tokenizer):
    lines = []
    D.build_pairs([ROW, BAD[3][0], BAD[3][0]], tokenizer, 256, 128, "drop", "t", log=lines.append)
    assert lines == ["t: dropped 2 row(s) [identical_responses], row ids [1, 2]"]


def test_truncation_prompt_left_first_then_response_right():
    p, c, r = list(range(10)), [100, 101, 102], [200, 201]
    assert D.truncate(p, c, r, 13, 5) == (p, c, r)  # fits: untouched
    assert D.truncate(p, c, r, 12, 5) == (p[-5:], c, r)  # prompt cut from the left only
    assert D.truncate(p, c, r, 7, 5) == (p[-5:], c[:2], r[:2])  # then responses from the right
    assert D.truncate(p, c, r, 7, 7) == (p[-7:], [], [])  # no room left: encode drops the pair


def test_truncation_through_encode(tokenizer):
    long = dict(ROW, prompt="What is " + " + ".join(["1"] * 30) + "?")
    p, c, r = D.encode(tokenizer, long, 40, 20)
    full_p, full_c, _ = D.encode(tokenizer, long, 1000, 999)
    assert p == full_p[-20:] and c == full_c[: 40 - 20] and len(p) + max(len(c), len(r)) <= 40
    with pytest.raises(D.BadRow, match="empty_after_truncation"):
        D.encode(tokenizer, long, 20, 20)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow", "dir"])
def test_local_formats_load(tmp_path, fmt):
    import datasets

    rows = [ROW, UF_ROW] if fmt == "jsonl" else [ROW, dict(ROW, chosen="The answer is five.")]
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        ds = datasets.Dataset.from_list(rows)
        path = tmp_path / ("d." + fmt if fmt != "dir" else "d")
        if fmt == "parquet":
            ds.to_parquet(str(path))
        elif fmt == "dir":
            ds.save_to_disk(str(path))
        else:
            path = tmp_path / "d.arrow"
            import pyarrow as pa

            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, ds.data.table.schema) as w:
                w.write_table(ds.data.table)
    assert len(D.load_rows(str(path), "train")) == 2


def test_bad_data_path_message():
    with pytest.raises(ValueError, match="data.path"):
        D.load_rows("nonexistent.txt", "train")
    with pytest.raises(FileNotFoundError, match="data.path"):
        D.load_rows("missing.jsonl", "train")


def test_order_is_seeded_and_world_size_invariant():
    n, g = 40, 8
    assert D.step_indices(n, 1, 0, n, 0, 1) == D.step_indices(n, 1, 0, n, 0, 1) != D.step_indices(n, 2, 0, n, 0, 1)
    assert sorted(D.step_indices(n, 1, 0, n, 0, 1)) == list(range(n))
    for step in range(7):  # crosses an epoch boundary (5 steps per epoch)
        per_micro = D.micro_batches(n, 3, step, g, 2, 2)  # [micro-batch][rank]: the ranks' blocks, in order
        assert [x for r in range(2) for mb in per_micro for x in mb[r]] == D.step_indices(n, 3, step, g, 0, 1)
        one = D.step_indices(n, 3, step, g, 0, 1)
        two = D.step_indices(n, 3, step, g, 0, 2) + D.step_indices(n, 3, step, g, 1, 2)
        assert one == two and len(set(one)) == g
    assert set(sum((D.step_indices(n, 3, s, g, 0, 1) for s in range(5)), [])) == set(range(n))


def test_length_grouping_reorders_only_within_a_rank_share():
    n, g, world, micro = 48, 16, 2, 2
    lengths = [(i * 37) % 23 for i in range(n)]
    for step in range(4):
        plain = D.micro_batches(n, 5, step, g, micro, world)
        grouped = D.micro_batches(n, 5, step, g, micro, world, lengths)
        for r in range(world):  # same pairs on the same rank, longest first
            mine = [i for mb in grouped for i in mb[r]]
            assert sorted(mine) == sorted(i for mb in plain for i in mb[r])
            assert [lengths[i] for i in mine] == sorted((lengths[i] for i in mine), reverse=True)


def test_padding_fraction_falls_with_length_grouping():
    g = __import__("random").Random(0)
    pairs = [D.Pair(i, [1] * g.randint(5, 200), [2] * g.randint(1, 400), [3] * g.randint(1, 400)) for i in range(256)]
    lengths = [D.padded_length(p) for p in pairs]
    plans = [D.micro_batches(256, 0, s, 64, 4, 2) for s in range(4)]
    grouped = [D.micro_batches(256, 0, s, 64, 4, 2, lengths) for s in range(4)]
    before, after = D.padding_fraction(pairs, plans), D.padding_fraction(pairs, grouped)
    assert 0 < after < before
    one = [[[[0]]]]  # a single pair: only the shorter response is padded
    p0 = pairs[0]
    want = 1 - (2 * len(p0.prompt_ids) + len(p0.chosen_ids) + len(p0.rejected_ids)) / (2 * D.padded_length(p0))
    assert D.padding_fraction(pairs, one) == pytest.approx(want)


def test_pairs_identical_after_truncation_are_dropped(tokenizer):
    # the responses differ only after the first 8 tokens, which truncation cuts off
    row = {"prompt": "Repeat: 1 2", "chosen": "1 2 3 4 5 6 7 8 9 1", "rejected": "1 2 3 4 5 6 7 8 9 2"}
    kept, _ = D.build_pairs([row], tokenizer, 256, 128, "drop", "t")
    assert len(kept) == 1
    p = kept[0]
    cut = len(p.prompt_ids) + 3  # room for 3 response tokens: identical prefixes
    assert p.chosen_ids[:3] == p.rejected_ids[:3]
    with pytest.raises(ValueError, match="no usable preference pairs.*identical_after_truncation"):
        D.build_pairs([row], tokenizer, cut, len(p.prompt_ids), "drop", "t")


def test_eval_fraction_holds_out_disjoint_seeded_rows(world):
    from fpo_ds import config as C

    cfg = C.DataConfig(path=str(world / "data" / "train.jsonl"), eval_fraction=0.25, seed=3)
    train, held = D.select_rows(cfg, "train"), D.select_rows(cfg, "eval")
    assert len(train) == 48 and len(held) == 16  # the world's 64 rows
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    again = D.select_rows(cfg, "eval")
    assert [key(r) for r in again] == [key(r) for r in held] and again._fingerprint == held._fingerprint
    other = D.select_rows(C.DataConfig(path=cfg.path, eval_fraction=0.25, seed=4), "eval")
    assert [key(r) for r in other] != [key(r) for r in held]
    with pytest.raises(ValueError, match="data.eval_split or data.eval_fraction"):
        D.select_rows(C.DataConfig(path=cfg.path), "eval")


@pytest.mark.parametrize("n,micro,world", [(8, 2, 2), (7, 2, 2), (5, 1, 4), (3, 4, 2), (0, 1, 2)])
def test_eval_plan_covers_every_pair_once_with_equal_rounds(n, micro, world):
    plan = D.eval_plan(n, micro, world)
    seen = sorted(j for rounds in plan for ix in rounds for j in ix if j >= 0)
    assert seen == list(range(n))
    assert all(len(rounds) == world and all(len(ix) == micro for ix in rounds) for rounds in plan)


def _block_order(n: int, seed: int, step: int, g: int) -> list[int]:
    """The order written out plainly: epoch 0 cuts one permutation into batches; later epochs shuffle those batches."""
    per_epoch = n // g
    epoch, s = divmod(step, per_epoch)
    first = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003)).tolist()
    if epoch:
        s = torch.randperm(per_epoch, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()[s]
    return first[s * g : (s + 1) * g]


def test_order_is_the_seeded_batches_of_one_permutation_reshuffled_each_epoch():
    for n, g, seed in ((40, 8, 3), (50, 16, 0), (64, 64, 7)):
        order = D.Order(n, seed, g)
        for step in range(3 * (n // g) + 1):
            assert order.positions(step) == _block_order(n, seed, step, g), (n, g, step)
            assert order.epochs_done(step + 1) == pytest.approx((step + 1) / (n // g))
        assert order.total_steps(3, None) == 3 * (n // g) and order.total_steps(3, 2) == 2
    with pytest.raises(ValueError, match=r"data: 7 usable pairs is less than one global batch \(train.global_batch_"):
        D.Order(7, 0, 8)


@pytest.mark.parametrize(
    "n,g0,g1,k", [(64, 8, 16, 4), (64, 16, 8, 3), (100, 8, 24, 5), (64, 8, 16, 8), (96, 8, 32, 11)]
)
def test_a_resume_with_another_batch_size_trains_every_pair_once_per_epoch(n, g0, g1, k):
    """Steps 1..k of g0 pairs, then a resume with g1: the epoch is finished without a pair skipped or repeated."""
    before = D.Order(n, 1, g0)
    state = before.state(k)
    after = D.Order(**{**state, "global_batch": g1})
    total = after.total_steps(3, None)
    steps = [before.positions(s) for s in range(k)] + [after.positions(s) for s in range(k, total)]
    assert [len(s) for s in steps] == [g0] * k + [g1] * (total - k)
    ends = [s for s in range(k, total + 1) if after.epochs_done(s) == int(after.epochs_done(s)) and s > 0]
    epochs, start = [], 0
    for end in ends:  # the steps of each epoch: no pair twice, and at most one short batch left out
        trained = [i for s in steps[start:end] for i in s]
        assert len(set(trained)) == len(trained), (start, end)
        assert n - len(trained) < max(g0, g1)
        epochs.append(trained)
        start = end
    assert len(epochs) == 3 and after.epochs_done(total) == 3.0
    assert epochs[0][: k * g0] == [i for s in range(k) for i in D.Order(n, 1, g0).positions(s)]
    assert after.state(total)["samples_before"] == k * g0 + (total - k) * g1
    # the state after the resume's own steps continues it again, to the same positions
    again = D.Order(**after.state(k + 1))
    assert [again.positions(s) for s in range(k + 1, total)] == steps[k + 1 :]
    with pytest.raises(
        ValueError, match=rf"train.max_steps={total + 1} is more than the data gives.*resumed at step {k}"
    ):
        after.total_steps(3, total + 1)


@pytest.mark.parametrize("n,g,world", [(100, 8, 2), (64, 16, 4), (50, 24, 2)])
def test_the_cache_partition_holds_every_pair_once(n, g, world):
    """Each rank's trained positions first, then a share of the remainder: every pair, once, for any later order."""
    from fpo_ds import cache
    from fpo_ds import config as C

    recipe = C.from_dict({"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl", "seed": 3},
                          "loss": {"method": "dpo"}, "train": {"global_batch_size": g}})  # fmt: skip
    parts = [cache.rank_positions(n, recipe, r, world) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    order = D.Order(n, 3, g)
    for r in range(world):
        assert parts[r][: (n // g) * g // world] == [i for s in range(n // g) for i in order.positions(s, r, world)]
