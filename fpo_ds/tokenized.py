"""The tokenized-data cache: rows -> token id columns, written once, checked before use.

    <datasets cache>/fpo_ds-tokenized/<key>/   save_to_disk output of the id columns
        fpo_ds.json                            written last: its key, row count, sha256 per file

The key hashes everything that decides the ids (the selected rows' fingerprint, the row format,
the tokenizer's vocabulary and chat template, the lengths). A directory without fpo_ds.json, or
whose files no longer match their checksums, is damaged: the writer names it and rebuilds it;
ids outside the tokenizer's vocabulary are refused with the directory to delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from fpo_ds import integrity

FORMAT = 3  # 2: per-row format column, fpo_ds.json with checksums; 3: untruncated lengths
MANIFEST = "fpo_ds.json"
COLUMNS = ("example_id", "prompt_ids", "chosen_ids", "rejected_ids", "bad", "format", "full_lengths")


class DamagedCache(ValueError):
    """A tokenized set that does not match what was written."""


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the vocabulary and the chat template: what decides the token ids of a row."""
    text = json.dumps(tokenizer.get_vocab(), sort_keys=True) + str(tokenizer.chat_template)
    return hashlib.sha256(text.encode()).hexdigest()


def key(rows, fmt: str, tokenizer, max_length: int, max_prompt_length: int) -> list:
    return [FORMAT, rows._fingerprint, fmt, tokenizer_digest(tokenizer), max_length, max_prompt_length]


def path_for(k: list) -> Path:
    import datasets

    digest = hashlib.sha256(json.dumps(k).encode()).hexdigest()[:20]
    return Path(datasets.config.HF_DATASETS_CACHE) / "fpo_ds-tokenized" / digest


def _files(directory: Path) -> dict[str, str]:
    return {f.name: integrity.sha256(f) for f in sorted(directory.iterdir()) if f.is_file() and f.name != MANIFEST}


def write(ds, directory: Path, k: list) -> None:
    """Save the id columns under `directory` atomically, with a manifest of their checksums."""
    tmp = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    manifest = {"key": k, "rows": len(ds), "files": _files(tmp)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    try:
        os.replace(tmp, directory)
    except OSError:  # another writer finished first: its result is identical
        shutil.rmtree(tmp, ignore_errors=True)


def check(directory: Path, k: list) -> None:
    """Raise DamagedCache naming the file when `directory` is not what its manifest says it wrote."""
    m = directory / MANIFEST
    if not m.is_file():
        raise DamagedCache(f"{directory} has no {MANIFEST} (an unfinished or older write)")
    try:
        manifest = json.loads(m.read_text())
    except (ValueError, OSError) as e:
        raise DamagedCache(f"{m} is unreadable ({e})") from None
    if manifest.get("key") != k:
        raise DamagedCache(f"{m} records another key ({manifest.get('key')}, expected {k})")
    have = _files(directory)
    for name, digest in manifest.get("files", {}).items():
        if name not in have:
            raise DamagedCache(f"{directory / name} is missing")
        if have[name] != digest:
            raise DamagedCache(f"{directory / name} does not match its checksum (changed or truncated)")


def ensure(directory: Path, k: list, build, log) -> None:
    """Build `directory` if absent; a damaged one is named, moved aside and rebuilt."""
    if directory.is_dir():
        try:
            check(directory, k)
            return
        except DamagedCache as e:
            aside = directory.with_name(f"{directory.name}.damaged-{os.getpid()}")
            log(f"data: the tokenized set is damaged: {e}; rebuilding it (the damaged copy: {aside})")
            try:
                os.replace(directory, aside)
                shutil.rmtree(aside, ignore_errors=True)
            except OSError as err:
                raise DamagedCache(f"{e}; it could not be moved aside ({err}): delete {directory} and rerun") from None
    build()


def read(directory: Path, vocab_size: int):
    """The id columns as Python lists (in COLUMNS order); ids outside [0, vocab_size) are refused."""
    import datasets
    import pyarrow.compute as pc

    try:
        table = datasets.load_from_disk(str(directory)).data  # memory-mapped Arrow: columns convert in bulk
    except Exception as e:  # pyarrow/datasets errors on a damaged directory
        raise DamagedCache(f"{directory} cannot be read ({type(e).__name__}: {e}); delete it and rerun") from None
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        flat = pc.list_flatten(table.column(name))
        if len(flat) and (pc.min(flat).as_py() < 0 or pc.max(flat).as_py() >= vocab_size):
            lo, hi = pc.min(flat).as_py(), pc.max(flat).as_py()
            raise DamagedCache(
                f"{directory}: {name} holds token ids in [{lo}, {hi}], outside the tokenizer's vocabulary "
                f"of {vocab_size}: the set is damaged or from another tokenizer; delete {directory} and rerun"
            )
    return [table.column(k).to_pylist() for k in COLUMNS]
