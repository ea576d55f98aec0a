"""Preference data: load rows, apply the chat template, truncate, batch.

A row is either (prompt, chosen, rejected) strings or the UltraFeedback-binarized shape
(chosen/rejected are message lists ending with the assistant turn). Each kept pair carries
its `example_id` (row index in the source split) so caches and resumes can name it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from fpo_ds.losses import IGNORE_INDEX

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


class BadRow(ValueError):
    """A row that cannot become a preference pair; `reason` is the counted kind."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}{': ' + detail if detail else ''}")


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


def load_rows(path: str, split: str):
    """A `datasets.Dataset` from a local file/dir or a hub dataset name."""
    import datasets

    p = Path(path)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    if p.suffix in LOCAL_BUILDERS:
        if not p.is_file():
            from fpo_ds.config import WORLD_HINT

            raise FileNotFoundError(
                f"data.path: {p} does not exist under {Path.cwd()}: pass data.path=<jsonl/json/parquet/arrow file, "
                f"save_to_disk directory or hub dataset>. {WORLD_HINT}"
            )
        if p.stat().st_size == 0:
            raise ValueError(f"data.path: {p} is empty; point data.path at a file with preference rows")
        if p.suffix == ".jsonl":
            check_jsonl(p)
        try:
            return datasets.load_dataset(LOCAL_BUILDERS[p.suffix], data_files=str(p), split="train")
        except Exception as e:  # datasets/pyarrow errors: say which file and why, not a deep traceback
            cause = e.__cause__ or e
            raise ValueError(
                f"data.path: {p} could not be read as {LOCAL_BUILDERS[p.suffix]}: {type(cause).__name__}: {cause}. "
                "Fix or regenerate the file"
            ) from None
    if p.suffix or "/" not in path:
        raise ValueError(
            f"data.path: {path!r} is neither a local .jsonl/.json/.parquet/.arrow file, a saved dataset "
            "directory, nor a hub dataset name like HuggingFaceH4/ultrafeedback_binarized"
        )
    from fpo_ds import hub

    with hub.named("data.path", path, "data.path=<jsonl/json/parquet/arrow file or save_to_disk directory>"):
        return datasets.load_dataset(path, split=split)  # e.g. HuggingFaceH4/ultrafeedback_binarized, train_prefs


def check_jsonl(path: Path) -> None:
    """Every line UTF-8 and one JSON object; the error names the first bad lines."""
    import json

    bad = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                if not isinstance(json.loads(raw.decode("utf-8")), dict):
                    bad.append(f"line {n}: not a JSON object")
            except UnicodeDecodeError as e:
                bad.append(f"line {n}: not UTF-8 ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:
                bad.append(f"line {n}: invalid JSON ({e.msg}, column {e.colno})")
            if len(bad) >= 5:
                break
    if bad:
        raise ValueError(
            f"data.path: {path} has malformed lines: {'; '.join(bad)}. Each line must be one UTF-8 JSON object "
            "with prompt/chosen/rejected; fix or delete those lines"
        )


# ----------------------------------------------------------------------------- rows -> messages


def _messages(value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRow("malformed_messages", f"{key} is not a non-empty message list")
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRow("malformed_messages", f"{key} has a message without string role/content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def normalise(row: dict) -> tuple[list[dict], str, str]:
    """Row -> (prompt messages, chosen text, rejected text), or raise BadRow."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise BadRow("missing_field", key)
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) or isinstance(rejected, list):
        cm, rm = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        if cm[-1]["role"] != "assistant" or rm[-1]["role"] != "assistant":
            raise BadRow("malformed_messages", "last message must be the assistant's response")
        if cm[:-1] != rm[:-1]:
            raise BadRow("prompt_mismatch", "chosen and rejected conversations differ before the response")
        prompt = cm[:-1]
        if not prompt and isinstance(row.get("prompt"), str) and row["prompt"].strip():
            prompt = [{"role": "user", "content": row["prompt"]}]
        chosen, rejected = cm[-1]["content"], rm[-1]["content"]
    else:
        raw_prompt = row.get("prompt")
        if raw_prompt is None:
            raise BadRow("missing_field", "prompt")
        if isinstance(raw_prompt, list):
            prompt = _messages(raw_prompt, "prompt")
        elif isinstance(raw_prompt, str):
            prompt = [{"role": "user", "content": raw_prompt}]
        else:
            raise BadRow("non_string_prompt", f"prompt is {type(raw_prompt).__name__}")
    if not prompt or not isinstance(prompt, list) or not any(m["content"].strip() for m in prompt):
        raise BadRow("empty_prompt")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str):
            raise BadRow("non_string_response", f"{key} is {type(text).__name__}")
        if not text.strip():
            raise BadRow("empty_response", key)
    if chosen == rejected:
        raise BadRow("identical_responses")
    return prompt, chosen, rejected


# ----------------------------------------------------------------------------- tokenisation


def _response_text(tokenizer, prompt: list[dict], prompt_text: str, response: str) -> str:
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
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


def encode(tokenizer, row: dict, max_length: int, max_prompt_length: int) -> tuple[list, list, list]:
    prompt, chosen, rejected = normalise(row)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    p = ids(prompt_text)
    c = ids(_response_text(tokenizer, prompt, prompt_text, chosen))
    r = ids(_response_text(tokenizer, prompt, prompt_text, rejected))
    p, c, r = truncate(p, c, r, max_length, max_prompt_length)
    if not c or not r:
        raise BadRow("empty_after_truncation")
    if c == r:  # no preference left to learn: it would only dilute the loss and accuracy
        raise BadRow("identical_after_truncation", "chosen and rejected token ids are equal")
    return p, c, r


def _encode_row(tokenizer, row: dict, max_length: int, max_prompt_length: int) -> tuple[list, list, list, str]:
    """(prompt, chosen, rejected) ids and "" for a usable row; empty lists and why ("reason: detail") otherwise."""
    try:
        return (*encode(tokenizer, row, max_length, max_prompt_length), "")
    except BadRow as e:
        return [], [], [], str(e)


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


def build_pairs(rows, tokenizer, max_length: int, max_prompt_length: int, on_bad_row: str, source: str, log=None):
    """Tokenise every row in this process; drop (and count, with row ids) or fail on bad rows."""
    records = ((i, *_encode_row(tokenizer, row, max_length, max_prompt_length)) for i, row in enumerate(rows))
    return _collect(records, on_bad_row, source, log)


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the vocabulary and the chat template: what decides the token ids of a row."""
    text = json.dumps(tokenizer.get_vocab(), sort_keys=True) + str(tokenizer.chat_template)
    return hashlib.sha256(text.encode()).hexdigest()


Part = Literal["train", "eval"]  # the rows trained on, or the held-out rows


def select_rows(data_cfg, part: Part = "train"):
    """The recipe's training rows, or its held-out rows (`part`).

    Training rows: data.split, cut to data.max_samples, less any held-out share. Held-out rows:
    data.eval_split of data.path, or the data.eval_fraction share held out of data.split. The hold-out
    is a seeded shuffle-split (data.seed), so every rank and every resume draws the same rows.
    """
    d = data_cfg
    if part == "eval" and d.eval_split is not None:
        return load_rows(d.path, d.eval_split)
    if part == "eval" and d.eval_fraction is None:
        raise ValueError("data: no held-out pairs; set data.eval_split or data.eval_fraction")
    rows = load_rows(d.path, d.split)
    if d.max_samples is not None:
        rows = rows.select(range(min(d.max_samples, len(rows))))
    if d.eval_fraction is None:
        return rows
    if len(rows) < 2:
        raise ValueError(f"data.eval_fraction: {d.path} [{d.split}] has {len(rows)} row(s); nothing to hold out")
    parts = rows.train_test_split(test_size=d.eval_fraction, seed=d.seed, shuffle=True)
    return parts["test" if part == "eval" else "train"]


def rows_source(data_cfg, part: Part) -> str:
    """How messages name the rows: path [split], and which part."""
    d = data_cfg
    if part == "eval":
        return f"{d.path} [{d.eval_split}]" if d.eval_split else f"{d.path} [{d.split}, held-out {d.eval_fraction}]"
    return f"{d.path} [{d.split}]" + (f" less the held-out {d.eval_fraction}" if d.eval_fraction else "")


def has_eval(data_cfg) -> bool:
    return data_cfg.eval_split is not None or data_cfg.eval_fraction is not None


def tokenized_path(data_cfg, tokenizer, rows) -> Path:
    """Where the tokenised rows live: keyed by everything that decides them (rows, tokenizer, lengths)."""
    import datasets

    key = [TOKENIZED_FORMAT, rows._fingerprint, tokenizer_digest(tokenizer), data_cfg.max_length]
    key.append(data_cfg.max_prompt_length)
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]
    return Path(datasets.config.HF_DATASETS_CACHE) / "fpo_ds-tokenized" / digest


TOKENIZED_FORMAT = 1


def _encode_rows(batch: dict, indices: list[int], tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """datasets.map function: a batch of rows -> token id columns, and why a row is unusable ("" if usable)."""
    names = ("prompt_ids", "chosen_ids", "rejected_ids", "bad")
    out: dict[str, list] = {"example_id": list(indices), **{k: [] for k in names}}
    for j in range(len(indices)):
        got = _encode_row(tokenizer, {k: v[j] for k, v in batch.items()}, max_length, max_prompt_length)
        for key, value in zip(names, got):
            out[key].append(value)
    return out


def tokenize_to_disk(rows, tokenizer, data_cfg, path: Path, num_proc: int = 1) -> None:
    """Tokenise every row once (num_proc processes) and save the columns under `path` (atomically)."""
    num_proc = num_proc if len(rows) >= 2000 else 1  # forking workers costs more than a small set
    cfg_prompt = data_cfg.max_prompt_length
    ds = rows.map(
        _encode_rows,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "max_length": data_cfg.max_length, "max_prompt_length": cfg_prompt},
        desc=f"tokenizing {data_cfg.path}",
        load_from_cache_file=False,
    )
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    ds.save_to_disk(str(tmp))
    try:
        os.replace(tmp, path)
    except OSError:  # another writer finished first: its result is identical
        shutil.rmtree(tmp, ignore_errors=True)


def read_tokenized(path: Path, on_bad_row: str, source: str, log=None) -> list[Pair]:
    """The saved columns -> pairs in source row order; bad rows dropped (counted) or, with `fail`, refused."""
    import datasets

    table = datasets.load_from_disk(str(path)).data  # memory-mapped Arrow: columns convert in bulk
    cols = [table.column(k).to_pylist() for k in ("example_id", "prompt_ids", "chosen_ids", "rejected_ids", "bad")]
    return _collect(zip(*cols), on_bad_row, source, log)[0]


def load_pairs(data_cfg, tokenizer, part: Part = "train", log=None) -> tuple[list[Pair], str]:
    """Recipe data section -> (tokenised pairs in source row order, dataset fingerprint), in this process.

    Distributed runs use components.load_data instead: one rank tokenises, the others load its result.
    """
    rows = select_rows(data_cfg, part)
    path = tokenized_path(data_cfg, tokenizer, rows)
    if not path.is_dir():
        tokenize_to_disk(rows, tokenizer, data_cfg, path)
    source = rows_source(data_cfg, part)
    return read_tokenized(path, data_cfg.on_bad_row, source, log), rows._fingerprint


# ----------------------------------------------------------------------------- order and batches


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def step_indices(n: int, seed: int, step: int, global_batch: int, rank: int, world: int) -> list[int]:
    """Positions (into the pair list) this rank trains on at optimizer step `step`.

    Global batch s is order[s*G:(s+1)*G] of one seeded permutation; rank r takes the r-th
    contiguous block of G/world, consumed in micro-batches. The union over ranks does not
    depend on world size or micro batch, so those settings are interchangeable. Later
    epochs visit the same global batches in a new seeded order: which rank holds which
    pair never changes, so the offline cache partitioned at build time stays rank-local.
    """
    steps_per_epoch = n // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"only {n} pairs: fewer than one global batch ({global_batch})")
    epoch, s = divmod(step, steps_per_epoch)
    if epoch:
        s = _permutation(steps_per_epoch, seed, epoch)[s]
    per_rank = global_batch // world
    start = s * global_batch + rank * per_rank
    return list(_permutation(n, seed, 0)[start : start + per_rank])


def padded_length(pair: Pair) -> int:
    """Positions the pair occupies in a batch: prompt + the longer response (chosen and rejected share a width)."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def micro_batches(
    n: int, seed: int, step: int, global_batch: int, micro: int, world: int, lengths: list[int] | None = None
) -> list[list[list[int]]]:
    """Positions of optimizer step `step`, as [micro-batch][rank] -> that rank's positions.

    With `lengths` (padded length per position), each rank's share is ordered longest first
    before it is cut into micro-batches, so pairs of similar length pad together. That only
    reorders a rank's own pairs within the step: which pairs a step sees and which rank holds
    them are unchanged (the offline cache partition and exact resume hold). Every rank computes
    every rank's share (arithmetic on one seeded permutation), so anything sized by the busiest
    rank of a micro-batch needs no collective.
    """
    every = [step_indices(n, seed, step, global_batch, r, world) for r in range(world)]
    if lengths is not None:
        every = [sorted(ix, key=lambda i: (-lengths[i], i)) for ix in every]
    return [[ix[i : i + micro] for ix in every] for i in range(0, global_batch // world, micro)]


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
