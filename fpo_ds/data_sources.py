"""Where rows come from: local files, globs, `save_to_disk` directories, hub data sets, and mixtures.

A `Source` is one place rows are read from (path, split, hub name/revision, format). `data.mix`
lists several, each cut to a `count` of rows or to a `weight` (its share of the mix); a recipe
without `data.mix` is one source built from data.path/split/name/revision/format. Every choice is
seeded by data.seed, so every rank and every resume selects the same rows.
"""

from __future__ import annotations

import glob as globlib
import json
from pathlib import Path
from typing import NamedTuple

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
LOCAL_SPLIT = "train"  # a local file (or glob of files) is one split, named like datasets names it


class Source(NamedTuple):
    key: str  # the recipe key that names it in errors: data or data.mix[i]
    path: str
    split: str
    name: str | None = None
    revision: str | None = None
    format: str = "auto"
    weight: float | None = None
    count: int | None = None

    @property
    def label(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in (("name", self.name), ("revision", self.revision)) if v)
        return f"{self.path} [{self.split}{extra}]"


def sources(data_cfg) -> list[Source]:
    """The recipe's sources: data.mix, or the one source of data.path."""
    d = data_cfg
    if d.mix:
        return [
            Source(f"data.mix[{i}]", m.path, m.split, m.name, m.revision, m.format, m.weight, m.count)
            for i, m in enumerate(d.mix)
        ]
    return [Source("data", d.path, d.split, d.name, d.revision, d.format)]


def eval_source(data_cfg) -> Source:
    """Where data.eval_split is read: data.eval_path, else data.path (with its hub name and revision)."""
    d = data_cfg
    if d.eval_path is not None and d.eval_path != d.path:
        return Source("data.eval_path", d.eval_path, d.eval_split, format=d.format)
    return Source("data", d.path, d.eval_split, d.name, d.revision, d.format)


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _is_saved(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def kind(path: str) -> str:
    """glob, saved (a save_to_disk directory), file, dir (data files, read by datasets), or hub."""
    p = Path(path)
    if _is_glob(path):
        return "glob"
    if p.is_dir():
        return "saved" if _is_saved(p) else "dir"
    if p.suffix or p.exists() or "/" not in path or path.startswith((".", "/")):
        return "file"
    return "hub"


def split_names(src: Source) -> list[str] | None:
    """The splits the source has (None where that cannot be known offline: an uncached hub data set)."""
    k = kind(src.path)
    if k in ("glob", "file"):
        return [LOCAL_SPLIT]
    if k == "saved":
        p = Path(src.path)
        if (p / "dataset_dict.json").is_file():
            return list(json.loads((p / "dataset_dict.json").read_text())["splits"])
        return [LOCAL_SPLIT]
    import datasets

    try:
        return list(datasets.get_dataset_split_names(src.path, src.name, revision=src.revision))
    except Exception:  # offline and not cached, or no such data set: loading reports it in full
        return None


def split_problems(data_cfg) -> list[str]:
    """Splits the recipe names that its sources do not have (`fpo-ds validate`; no download)."""
    problems = []
    for src in sources(data_cfg):
        if src.path is None:
            continue
        wanted = [(src, f"{src.key}.split", src.split)]
        if src.key == "data" and data_cfg.eval_split is not None:
            wanted.append((eval_source(data_cfg), "data.eval_split", data_cfg.eval_split))
        for where, key, split in wanted:
            have = split_names(where)
            if have is not None and split not in have:
                problems.append(str(_missing_split(where, split, have, key)))
    return problems


def _missing_split(src: Source, split: str, have: list[str], key: str) -> ValueError:
    local = " (a local file or glob has one split, train)" if kind(src.path) in ("glob", "file") else ""
    return ValueError(
        f"{key}: {src.path} has no split {split!r}{local}; available: {have}. "
        f"Set {key} to one of them" + ("" if key.endswith("eval_split") else ", or point the path at other data")
    )


def load(src: Source, split: str | None = None, key: str | None = None):
    """The rows of `split` (default src.split) of a source, as a `datasets.Dataset`."""
    import datasets

    split, key = split or src.split, key or f"{src.key}.split"
    k, p = kind(src.path), Path(src.path)
    if k in ("saved", "file", "glob"):
        have = split_names(src)
        if split not in have:
            raise _missing_split(src, split, have, key)
    if k == "saved":
        ds = datasets.load_from_disk(str(p))
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    if k == "file":
        return _load_file(p, src.key)
    if k == "glob":
        return _load_glob(src.path, src.key)
    from fpo_ds import hub

    try:
        with hub.named(f"{src.key}.path", src.path, f"{src.key}.path=<jsonl/json/parquet/csv/arrow file or directory>"):
            return datasets.load_dataset(src.path, src.name, split=split, revision=src.revision)
    except ValueError as e:
        if "Unknown split" in str(e) or "split" in str(e).lower() and "should be one of" in str(e).lower():
            have = split_names(src) or []
            raise _missing_split(src, split, have, key) from None
        raise


def _load_file(p: Path, key: str):
    from fpo_ds.local_paths import WORLD_HINT

    if p.suffix not in LOCAL_BUILDERS:
        raise ValueError(
            f"{key}.path: {str(p)!r} is neither a local .jsonl/.json/.parquet/.csv/.arrow file, a glob of such "
            "files, a saved dataset directory, nor a hub dataset name like HuggingFaceH4/ultrafeedback_binarized"
        )
    if not p.is_file():
        raise FileNotFoundError(
            f"{key}.path: {p} does not exist under {Path.cwd()}: pass {key}.path=<jsonl/json/parquet/csv/arrow "
            f"file, glob, save_to_disk directory or hub dataset>. {WORLD_HINT}"
        )
    if p.stat().st_size == 0:
        raise ValueError(f"{key}.path: {p} is empty; point {key}.path at a file with rows")
    if p.suffix == ".jsonl":
        check_jsonl(p, key)
    return _read_files(LOCAL_BUILDERS[p.suffix], [str(p)], f"{key}.path: {p}")


def _load_glob(pattern: str, key: str):
    files = sorted(f for f in globlib.glob(pattern, recursive=True) if Path(f).is_file())
    if not files:
        raise FileNotFoundError(f"{key}.path: the glob {pattern!r} matches no file under {Path.cwd()}")
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) > 1 or not suffixes <= set(LOCAL_BUILDERS):
        raise ValueError(
            f"{key}.path: the glob {pattern!r} matches files of types {sorted(suffixes)}; a glob must match "
            f"files of one type among {sorted(LOCAL_BUILDERS)}"
        )
    for f in files:
        if Path(f).suffix == ".jsonl":
            check_jsonl(Path(f), key)
    return _read_files(LOCAL_BUILDERS[suffixes.pop()], files, f"{key}.path: {pattern} ({len(files)} files)")


def _read_files(builder: str, files: list[str], what: str):
    """The files as one Dataset, through datasets' Arrow copy of them (kept in its cache, reused while unchanged).

    That copy can be damaged while the files are fine (a truncated or deleted cache file): it is
    then rebuilt from the files once, and said so. An error that remains is the files' own.
    """
    import datasets

    from fpo_ds import dist

    try:
        return datasets.load_dataset(builder, data_files=files, split=LOCAL_SPLIT)
    except Exception as e:  # datasets/pyarrow errors of a damaged cached copy
        first = e.__cause__ or e
    dist.log(
        f"data: datasets' cached Arrow copy of {what.split(': ', 1)[-1]} could not be read "
        f"({type(first).__name__}: {str(first)[:200]}); rebuilding it from the file(s)"
    )
    try:
        return datasets.load_dataset(builder, data_files=files, split=LOCAL_SPLIT, download_mode="force_redownload")
    except Exception as e:  # datasets/pyarrow errors: say which file and why, not a deep traceback
        cause = e.__cause__ or e
        raise ValueError(
            f"{what} could not be read as {builder}: {type(cause).__name__}: {cause}. Fix or regenerate the file"
        ) from None


def check_jsonl(path: Path, key: str = "data") -> None:
    """Every line UTF-8 and one JSON object; the error names the first bad lines."""
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
            f"{key}.path: {path} has malformed lines: {'; '.join(bad)}. Each line must be one UTF-8 JSON object "
            "with prompt/chosen/rejected (or another format of data.format); fix or delete those lines"
        )


# ----------------------------------------------------------------------------- mixtures


def mix_counts(sizes: list[int], srcs: list[Source], max_samples: int | None) -> list[int]:
    """Rows taken from each source.

    A `count` source gives that many rows (more than it has: its rows repeat, then a seeded
    sample of the rest). `weight` sources share the rest in proportion to their weights, as many
    rows as the scarcest of them allows without repeating any. data.max_samples then caps the
    total, each source keeping its share (rounded down, at least one row).
    """
    want = [s.count if s.count is not None else 0 for s in srcs]
    weighted = [i for i, s in enumerate(srcs) if s.count is None]
    if weighted:
        w = [srcs[i].weight if srcs[i].weight is not None else 1.0 for i in weighted]
        total = min(sizes[i] * sum(w) / wi for i, wi in zip(weighted, w))
        for i, wi in zip(weighted, w):
            want[i] = min(sizes[i], int(total * wi / sum(w)))
    if max_samples is not None and sum(want) > max_samples:
        scale = max_samples / sum(want)
        want = [max(1, int(n * scale)) if n else 0 for n in want]
    return want


def take(rows, n: int, seed: int, salt: int):
    """Take n rows of `rows`: a seeded choice kept in source order (n > len: every row once or more)."""
    import torch

    full, rest = divmod(n, len(rows))
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * salt + 17)
    picked = sorted(torch.randperm(len(rows), generator=g)[:rest].tolist())
    return rows.select(list(range(len(rows))) * full + picked)
