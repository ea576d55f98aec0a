"""Training data: select rows, apply the chat template, truncate, batch.

Rows come from one source or a mixture (fpo_ds.data_sources) in any of the preference or SFT
formats (fpo_ds.data_formats); they are tokenised once into a checked cache (fpo_ds.tokenized).
Each kept pair carries its `example_id` (row index in the selected rows, a mixture's sources one
after another) so caches and resumes can name it.
"""

from __future__ import annotations

import functools
import hashlib
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from fpo_ds import data_formats as F
from fpo_ds import data_sources as S
from fpo_ds import tokenized as T
from fpo_ds.data_formats import BadRow
from fpo_ds.data_sources import Source, check_jsonl

__all__ = ["BadRow", "Source", "check_jsonl", "load_rows"]  # re-exported: callers name them as data.*

IGNORE_INDEX = -100  # the label of prompt and padding positions (the Hugging Face loss ignores it)


@dataclass(frozen=True)
class Pair:
    example_id: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


class Batch(NamedTuple):
    """Chosen rows first, then rejected: one concatenated forward for both."""

    input_ids: torch.Tensor  # (2b, T)
    attention_mask: torch.Tensor  # (2b, T)
    labels: torch.Tensor  # (2b, T) token ids on response positions, IGNORE_INDEX elsewhere
    example_ids: torch.Tensor  # (b,)


# ----------------------------------------------------------------------------- loading


def load_rows(path: str, split: str, name: str | None = None, revision: str | None = None):
    """A `datasets.Dataset`: a local file, glob or directory, or a hub data set (with its name/revision)."""
    return S.load(S.Source("data", path, split, name, revision))


# ----------------------------------------------------------------------------- tokenisation


def _response_text(tokenizer, prompt: list[dict], prompt_text: str, response: list[dict]) -> str:
    full = _template(tokenizer, prompt + response)
    if not full.startswith(prompt_text):
        raise ValueError(
            "the tokenizer's chat template does not render the prompt (with add_generation_prompt) as a "
            "prefix of prompt + response; fpo-ds needs that to locate response tokens"
        )
    return full[len(prompt_text) :]


def truncate(p: list[int], c: list[int], r: list[int], max_length: int, max_prompt_length: int):
    """Prompt loses tokens from the left (to max_prompt_length) first, then responses from the right."""
    longest = max(len(c), len(r))
    if len(p) + longest > max_length:
        p = p[-max_prompt_length:]
    room = max_length - len(p)
    return p, c[:room], r[:room]


def _template(tokenizer, messages: list[dict], **kwargs) -> str:
    """The chat template's text; a template that refuses this row's messages drops the row (counted)."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as e:  # e.g. a system role or non-alternating turns the model's template rejects
        raise BadRow("chat_template", str(e)) from None


def render(tokenizer, conv: F.Conversation) -> tuple[list[int], list[int], list[int]]:
    """Conversation -> untruncated (prompt, chosen, rejected) ids; an SFT row's rejected is its chosen.

    sft_text has no chat template: BOS (where the tokenizer has one) is the prompt, the text and
    EOS the response.
    """
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if conv.format == "sft_text":
        full = tokenizer(conv.chosen[0]["content"])["input_ids"]
        if tokenizer.bos_token_id is not None and full[:1] != [tokenizer.bos_token_id]:
            full = [tokenizer.bos_token_id] + full
        if tokenizer.eos_token_id is not None and full[-1:] != [tokenizer.eos_token_id]:
            full = full + [tokenizer.eos_token_id]
        return full[:1], full[1:], full[1:]
    prompt_text = _template(tokenizer, conv.prompt, add_generation_prompt=True)
    c = ids(_response_text(tokenizer, conv.prompt, prompt_text, conv.chosen))
    r = c if conv.rejected is None else ids(_response_text(tokenizer, conv.prompt, prompt_text, conv.rejected))
    return ids(prompt_text), c, r


def encode_conversation(tokenizer, conv: F.Conversation, max_length: int, max_prompt_length: int):
    return _encode_full(tokenizer, conv, max_length, max_prompt_length)[:3]


def _encode_full(tokenizer, conv: F.Conversation, max_length: int, max_prompt_length: int):
    """Truncated (prompt, chosen, rejected) ids and their untruncated lengths; BadRow for an unusable pair."""
    full = render(tokenizer, conv)
    p, c, r = truncate(*full, max_length, max_prompt_length)
    if not c or not r:
        raise BadRow("empty_after_truncation")
    if c == r and conv.rejected is not None:  # no preference left to learn: it would only dilute the loss
        raise BadRow("identical_after_truncation", "chosen and rejected token ids are equal")
    return p, c, r, [len(x) for x in full]


def encode(tokenizer, row: dict, max_length: int, max_prompt_length: int, fmt: str = "auto"):
    """Row -> (prompt, chosen, rejected) token ids, truncated; raise BadRow for an unusable row."""
    return encode_conversation(tokenizer, F.normalise(row, fmt), max_length, max_prompt_length)


def _encode_row(tokenizer, row: dict, max_length: int, max_prompt_length: int, fmt: str = "auto"):
    """Ids, "", the format and the untruncated lengths for a usable row; empty lists and why otherwise."""
    try:
        conv = F.normalise(row, fmt)
        p, c, r, full = _encode_full(tokenizer, conv, max_length, max_prompt_length)
        return p, c, r, "", conv.format, full
    except BadRow as e:
        return [], [], [], str(e), fmt if fmt != "auto" else F.detect(row), [0, 0, 0]


def _collect(records, on_bad_row: str, source: str, log=None) -> tuple[list[Pair], dict[str, list[int]]]:
    """(row id, prompt, chosen, rejected, why) records -> pairs; bad rows dropped and counted, or refused."""
    pairs, bad = [], {}
    for i, p, c, r, why in records:
        if not why:
            pairs.append(Pair(i, p, c, r))
        elif on_bad_row == "fail":
            raise ValueError(f"{source}: row {i}: {why}. Fix the row, or set data.on_bad_row=drop to skip such rows")
        else:
            bad.setdefault(why.split(":")[0], []).append(i)
    if bad and log:
        for reason, ids in Counter({k: len(v) for k, v in bad.items()}).most_common():
            log(f"{source}: dropped {ids} row(s) [{reason}], row ids {bad[reason][:10]}{' ...' if ids > 10 else ''}")
    if not pairs:
        raise ValueError(f"{source}: no usable preference pairs (dropped: { {k: len(v) for k, v in bad.items()} })")
    return pairs, bad


def build_pairs(
    rows, tokenizer, max_length: int, max_prompt_length: int, on_bad_row: str, source: str, log=None, fmt="auto"
):
    """Tokenise every row in this process; drop (and count, with row ids) or fail on bad rows."""
    encoded = (_encode_row(tokenizer, row, max_length, max_prompt_length, fmt) for row in rows)
    records = ((i, *got[:4]) for i, got in enumerate(encoded))
    return _collect(records, on_bad_row, source, log)


tokenizer_digest = T.tokenizer_digest
LAST_SOURCES: list[dict] = []  # rows per source of the last training data loaded (stored in run_info.json)

Part = Literal["train", "eval"]  # the rows trained on, or the held-out rows


class Selection(NamedTuple):
    """The rows one source gives this part of the run."""

    source: S.Source
    rows: object  # datasets.Dataset
    label: str  # how messages name them: path [split], and which part
    read: int  # rows the source has (before any cut, hold-out or mix selection)


def select(data_cfg, part: Part = "train") -> list[Selection]:
    """The recipe's training rows, or its held-out rows (`part`), per source.

    One source: data.split, cut to data.max_samples, less any held-out share. Held-out rows:
    data.eval_split, or the data.eval_fraction share held out of data.split. A mixture
    (data.mix): each source's rows less its held-out share, then each source's count or weighted
    share (data_sources.mix_counts). Every hold-out and choice is seeded by data.seed, so every
    rank and every resume draws the same rows.
    """
    d = data_cfg
    srcs = S.sources(d)
    if part == "eval" and d.eval_split is not None:
        src = S.eval_source(d)
        rows = S.load(src, d.eval_split, "data.eval_split")
        return [Selection(src, rows, rows_source(d, part), len(rows))]
    if part == "eval" and d.eval_fraction is None:
        raise ValueError("data: no held-out pairs; set data.eval_split or data.eval_fraction")
    if not d.mix:
        rows = S.load(srcs[0])
        read = len(rows)
        if d.max_samples is not None:
            rows = rows.select(range(min(d.max_samples, len(rows))))
        if d.eval_fraction is not None:
            rows = _hold_out(rows, d, srcs[0])[part]
        return [Selection(srcs[0], rows, rows_source(d, part), read)]
    return _mix(d, srcs, part)


def _hold_out(rows, d, src: S.Source) -> dict:
    if len(rows) < 2:
        raise ValueError(f"data.eval_fraction: {src.label} has {len(rows)} row(s); nothing to hold out")
    parts = rows.train_test_split(test_size=d.eval_fraction, seed=d.seed, shuffle=True)
    return {"train": parts["train"], "eval": parts["test"]}


def _mix(d, srcs: list[S.Source], part: Part) -> list[Selection]:
    loaded = [S.load(s) for s in srcs]
    for src, rows in zip(srcs, loaded):
        if len(rows) == 0:
            raise ValueError(f"{src.key}.path: {src.label} has no rows; point it at data or drop it from data.mix")
    parts = [_hold_out(r, d, s) if d.eval_fraction else {"train": r} for r, s in zip(loaded, srcs)]
    counts = S.mix_counts([len(p["train"]) for p in parts], srcs, d.max_samples)
    out = []
    for i, (src, p, n) in enumerate(zip(srcs, parts, counts)):
        if n < 1:
            raise ValueError(f"{src.key}: its weight gives 0 of the mix's rows; raise its weight or set a count")
        if part == "eval":  # the held-out share of what the mix takes from this source
            f = d.eval_fraction
            n = min(len(p["eval"]), max(1, round(n * f / (1 - f))))
        rows = S.take(p[part], n, d.seed, i)
        what = "held-out " if part == "eval" else ""
        out.append(Selection(src, rows, f"{src.label}: {n} {what}rows of {len(p[part])}", len(loaded[i])))
    return out


def fingerprint(pairs: list[Pair]) -> str:
    """The data's fingerprint: a hash of the pairs' token ids, in order.

    It follows the content only, so data staged to another path or copied with a new modification
    time (a job's local scratch) keeps its fingerprint, and so its checkpoints and caches.
    """
    h = hashlib.sha256()
    for q in pairs:
        lengths = (q.example_id, len(q.prompt_ids), len(q.chosen_ids), len(q.rejected_ids))
        h.update(array("q", lengths).tobytes())
        h.update(array("q", q.prompt_ids + q.chosen_ids + q.rejected_ids).tobytes())
    return h.hexdigest()[:16]


def select_rows(data_cfg, part: Part = "train"):
    """The rows of a one-source recipe (tools that read rows directly)."""
    selections = select(data_cfg, part)
    if len(selections) > 1:
        raise ValueError("data.mix: this tool reads one source; use data.path")
    return selections[0].rows


def rows_source(data_cfg, part: Part) -> str:
    """How messages name the rows: path [split], and which part."""
    d = data_cfg
    if d.mix:
        return f"data.mix of {len(d.mix)} sources" + (" (held-out part)" if part == "eval" else "")
    if part == "eval":
        if d.eval_split:
            return f"{d.eval_path or d.path} [{d.eval_split}]"
        return f"{d.path} [{d.split}, held-out {d.eval_fraction}]"
    return f"{d.path} [{d.split}]" + (f" less the held-out {d.eval_fraction}" if d.eval_fraction else "")


def has_eval(data_cfg) -> bool:
    return data_cfg.eval_split is not None or data_cfg.eval_fraction is not None


def tokenized_key(data_cfg, tokenizer, sel: Selection) -> list:
    return T.key(sel.rows, sel.source.format, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length)


def _encode_rows(batch: dict, indices: list[int], tokenizer, max_length: int, max_prompt_length: int, fmt: str):
    """datasets.map function: a batch of rows -> token id columns, why a row is unusable ("" if usable), format."""
    names = T.COLUMNS[1:]
    out: dict[str, list] = {"example_id": list(indices), **{k: [] for k in names}}
    for j in range(len(indices)):
        got = _encode_row(tokenizer, {k: v[j] for k, v in batch.items()}, max_length, max_prompt_length, fmt)
        for key, value in zip(names, got):
            out[key].append(value)
    return out


def tokenize_to_disk(sel: Selection, tokenizer, data_cfg, path: Path, num_proc: int = 1, progress: bool = True):
    """Tokenise every row once (num_proc processes) and save the columns under `path` (atomically)."""
    rows = sel.rows
    num_proc = num_proc if len(rows) >= 2000 else 1  # forking workers costs more than a small set
    ds = rows.map(
        _encode_rows,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": data_cfg.max_length,
            "max_prompt_length": data_cfg.max_prompt_length,
            "fmt": sel.source.format,
        },
        desc=f"tokenizing {sel.source.label}",  # datasets' progress bar: rows/s and ETA
        load_from_cache_file=False,
    )
    T.write(ds, path, tokenized_key(data_cfg, tokenizer, sel))


class Loaded(NamedTuple):
    pairs: list[Pair]
    fingerprint: str  # of the pairs' token ids (fingerprint)
    sources: list[dict]  # per source: rows read, selected, kept, dropped per reason, formats


def read_tokenized(path: Path, on_bad_row: str, source: str, log=None, vocab_size: int = 2**62, offset: int = 0):
    """The saved columns -> (pairs in row order, dropped row ids per reason, {format: rows}).

    Bad rows are dropped (and counted) or, with on_bad_row=fail, refused. `offset` is added to
    the row ids (a mixture's later sources follow the earlier ones).
    """
    ids, p, c, r, bad, fmts, _ = T.read(path, vocab_size)
    pairs, dropped = _collect(zip([i + offset for i in ids], p, c, r, bad), on_bad_row, source, log)
    return pairs, dropped, dict(Counter(fmts))


def check_formats(formats: dict[str, int], method: str, source: str) -> None:
    """SFT rows have no rejected response: only method sft trains on them."""
    sft = {f: n for f, n in formats.items() if f in F.SFT}
    if sft and method != "sft":
        raise ValueError(
            f"{source}: {sum(sft.values())} row(s) in SFT format ({', '.join(sft)}) have no rejected response; "
            f"loss.method={method} needs preference rows. Use loss.method=sft, or point data at preference data"
        )


def describe_formats(formats: dict[str, int], forced: str) -> str:
    how = "forced by data.format" if forced != "auto" else "detected"
    return ", ".join(f"{f} ({n} rows)" for f, n in sorted(formats.items(), key=lambda x: -x[1])) + f", {how}"


def load(data_cfg, tokenizer, part: Part = "train", log=None, prepare=None) -> Loaded:
    """Recipe data section -> the tokenised pairs of every source, in row order.

    `prepare(selection, path, key, build)` makes sure the tokenized set at `path` exists and is intact
    (calling `build()` to write it); by default in this process. components.load_data passes one
    where one rank tokenises and the others wait.
    """
    log = log or (lambda message: None)
    d = data_cfg
    pairs, offset, sources = [], 0, []
    selections = select(d, part)
    for sel in selections:
        k = tokenized_key(d, tokenizer, sel)
        path = T.path_for(k)
        build = functools.partial(tokenize_to_disk, sel, tokenizer, d, path)
        if prepare is None:
            T.ensure(path, k, build, log)
        else:
            prepare(sel, path, k, build)
        got, dropped, formats = read_tokenized(path, d.on_bad_row, sel.label, log, len(tokenizer), offset)
        log(f"data: {sel.label}: format {describe_formats(formats, sel.source.format)}; {len(got)} pairs kept")
        pairs += got
        offset += len(sel.rows)
        sources.append(
            {
                "source": sel.label,
                "key": sel.source.key,
                "rows_read": sel.read,
                "rows_selected": len(sel.rows),
                "pairs_kept": len(got),
                "dropped": {reason: {"rows": len(ids), "example_ids": ids[:10]} for reason, ids in dropped.items()},
                "formats": formats,
                "tokenized": str(path),
            }
        )
    return Loaded(pairs, fingerprint(pairs), sources)


def load_pairs(data_cfg, tokenizer, part: Part = "train", log=None) -> tuple[list[Pair], str]:
    """(pairs, fingerprint) of the recipe's data, tokenised in this process (tools and tests)."""
    out = load(data_cfg, tokenizer, part, log)
    return out.pairs, out.fingerprint


# ----------------------------------------------------------------------------- order and batches


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int, block: int) -> tuple[int, ...]:
    """Positions of one epoch, in training order.

    Epoch 0 is one seeded permutation of the n positions. A later epoch visits the same blocks
    of `block` positions (the global batch that epoch began with) in a new seeded order, so
    which rank holds which pair never changes and the offline cache partitioned at build time
    stays rank-local. A last block shorter than `block` is left out of later epochs.
    """
    first = _permutation(n, seed, 0)
    if epoch == 0:
        return first
    return tuple(i for b in _permutation(n // block, seed, epoch) for i in first[b * block : (b + 1) * block])


@dataclass(frozen=True)
class Order:
    """Which pair positions each optimizer step trains on, from `start_step` on.

    Steps take `global_batch` consecutive positions of their epoch's order (`_epoch_order`);
    rank r takes the r-th contiguous block of global_batch/world. The union over ranks does not
    depend on world size or micro batch, so those settings are interchangeable. An epoch ends
    when fewer than `global_batch` of its positions remain (they are left out, as a drop-last
    sampler does).

    A resume continues where the order stood, in pair positions, not steps: `epoch` is the epoch
    in progress at `start_step`, `offset` how many of its positions earlier steps trained, and
    `epoch_block` the global batch that epoch began with (its order depends on it). So a resume
    with another global batch trains the rest of the epoch, every pair once, and the next epoch
    starts with the new batch size. `samples_before`: pairs trained before `start_step`.
    """

    n: int
    seed: int
    global_batch: int
    start_step: int = 0
    epoch: int = 0
    offset: int = 0
    epoch_block: int = 0  # 0: global_batch
    samples_before: int = 0

    def __post_init__(self):
        if self.n // self.global_batch == 0:
            raise ValueError(
                f"data: {self.n} usable pairs is less than one global batch (train.global_batch_size="
                f"{self.global_batch}); add data or lower the batch size"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def rest_of_epoch(self) -> tuple[tuple[int, ...], int]:
        """The epoch in progress at start_step: its order, and the steps left in it."""
        order = _epoch_order(self.n, self.seed, self.epoch, self.epoch_block or self.global_batch)
        return order, max(0, len(order) - self.offset) // self.global_batch

    def locate(self, step: int) -> tuple[int, tuple[int, ...], int, int]:
        """Step `step` (0-based): (its epoch, that epoch's order, its first position there, positions trained in it)."""
        k = step - self.start_step
        if k < 0:
            raise ValueError(f"step {step + 1} comes before this data order's start (step {self.start_step + 1})")
        order, left = self.rest_of_epoch()
        g = self.global_batch
        if k < left:
            return self.epoch, order, self.offset + k * g, self.offset + left * g
        e, k = self.epoch + 1 + (k - left) // self.steps_per_epoch, (k - left) % self.steps_per_epoch
        return e, _epoch_order(self.n, self.seed, e, g), k * g, self.steps_per_epoch * g

    def positions(self, step: int, rank: int = 0, world: int = 1) -> list[int]:
        """Positions (into the pair list) rank `rank` of `world` trains on at optimizer step `step` (0-based)."""
        _, order, at, _ = self.locate(step)
        per_rank = self.global_batch // world
        return list(order[at + rank * per_rank : at + (rank + 1) * per_rank])

    def micro_batches(self, step: int, micro: int, world: int, lengths: list[int] | None = None):
        """Positions of optimizer step `step`, as [micro-batch][rank] -> that rank's positions.

        With `lengths` (padded length per position), each rank's share is ordered longest first
        before it is cut into micro-batches, so pairs of similar length pad together. That only
        reorders a rank's own pairs within the step: which pairs a step sees and which rank holds
        them are unchanged (the offline cache partition and exact resume hold). Every rank computes
        every rank's share (arithmetic on one seeded permutation), so anything sized by the busiest
        rank of a micro-batch needs no collective.
        """
        every = [self.positions(step, r, world) for r in range(world)]
        if lengths is not None:
            every = [sorted(ix, key=lambda i: (-lengths[i], i)) for ix in every]
        return [[ix[i : i + micro] for ix in every] for i in range(0, self.global_batch // world, micro)]

    def epochs_done(self, done: int) -> float:
        """Epochs of this data set trained after `done` optimizer steps (a whole number at an epoch's end)."""
        if done <= self.start_step:  # an epoch whose rest is less than a global batch is done
            left = self.rest_of_epoch()[1]
            return self.epoch + self.offset / (self.offset + left * self.global_batch) if left else self.epoch + 1.0
        e, _, at, length = self.locate(done - 1)
        return e + (at + self.global_batch) / length

    def state(self, done: int) -> dict:
        """Where the order stands after `done` steps, for the checkpoint: `Order(**state)` continues it."""
        base = {"n": self.n, "seed": self.seed, "global_batch": self.global_batch, "start_step": done}
        if done <= self.start_step:
            block = self.epoch_block or self.global_batch
            return base | {"epoch": self.epoch, "offset": self.offset, "epoch_block": block,
                           "samples_before": self.samples_before}  # fmt: skip
        e, _, at, _ = self.locate(done - 1)
        block = (self.epoch_block or self.global_batch) if e == self.epoch else self.global_batch
        samples = self.samples_before + (done - self.start_step) * self.global_batch
        return base | {"epoch": e, "offset": at + self.global_batch, "epoch_block": block, "samples_before": samples}

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        """The run's last step: the end of epoch `epochs`, capped by max_steps (beyond it: refused, with the numbers).

        The LR schedule (warm-up, decay) is sized on this number: the steps the run really takes.
        """
        left = self.rest_of_epoch()[1]
        total = self.start_step if self.epoch >= epochs else (
            self.start_step + left + (epochs - self.epoch - 1) * self.steps_per_epoch)  # fmt: skip
        if max_steps and max_steps > total:
            at = f"resumed at step {self.start_step} (epoch {self.epochs_done(self.start_step):.3g})"
            where = f", {at}, ends at step {total}" if self.start_step else f" = {total} steps"
            need = self.epoch + 1 + -(-(max_steps - self.start_step - left) // self.steps_per_epoch)
            raise ValueError(
                f"train.max_steps={max_steps} is more than the data gives: {self.n} pairs // "
                f"train.global_batch_size={self.global_batch} = {self.steps_per_epoch} steps per epoch x "
                f"train.epochs={epochs}{where}. Set train.epochs={need} to train {max_steps} steps "
                f"(later epochs revisit the pairs in a new order), or train.max_steps={total} or less"
            )
        return min(total, max_steps) if max_steps else total


def step_indices(n: int, seed: int, step: int, global_batch: int, rank: int, world: int) -> list[int]:
    """Positions rank `rank` trains on at optimizer step `step` of a run that starts a fresh order (see Order)."""
    return Order(n, seed, global_batch).positions(step, rank, world)


def padded_length(pair: Pair) -> int:
    """Positions the pair occupies in a batch: prompt + the longer response (chosen and rejected share a width)."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def micro_batches(
    n: int, seed: int, step: int, global_batch: int, micro: int, world: int, lengths: list[int] | None = None
) -> list[list[list[int]]]:
    """Order.micro_batches of a run that starts a fresh order: [micro-batch][rank] -> that rank's positions."""
    return Order(n, seed, global_batch).micro_batches(step, micro, world, lengths)


def eval_plan(n: int, micro: int, world: int) -> list[list[list[int]]]:
    """Held-out positions in micro-batches: plan[i][r] is rank r's i-th micro-batch.

    Rank r takes positions r, r + world, ... Every rank runs the same number of micro-batches
    (ZeRO-3's forward is collective), so a rank with fewer pairs pads its last ones with -1.
    """
    mine = [list(range(r, n, world)) for r in range(world)]
    rounds = -(-max(len(m) for m in mine) // micro) if n else 0
    padded = [m + [-1] * (rounds * micro - len(m)) for m in mine]
    return [[p[i * micro : (i + 1) * micro] for p in padded] for i in range(rounds)]


def padding_fraction(pairs: list[Pair], plans: list[list[list[list[int]]]]) -> float:
    """Share of the token positions in the given micro-batch plans that are padding (chosen and rejected rows)."""
    real = padded = 0
    for plan in plans:
        for per_rank in plan:
            for positions in per_rank:
                chunk = [pairs[i] for i in positions]
                width = max(padded_length(p) for p in chunk)
                real += sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in chunk)
                padded += 2 * width * len(chunk)
    return 1 - real / max(padded, 1)


def response_tokens(pairs: list[Pair]) -> int:
    """Response tokens (chosen + rejected) in a micro-batch: the positions `collate` labels."""
    return sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def collate(pairs: list[Pair], pad_id: int) -> Batch:
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    plens = [len(p.prompt_ids) for p in pairs] * 2
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (s, pl) in enumerate(zip(seqs, plens)):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        labels[i, pl : len(s)] = torch.tensor(s[pl:])
    return Batch(ids, att, labels, torch.tensor([p.example_id for p in pairs]))
