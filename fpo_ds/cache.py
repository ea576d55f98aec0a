"""Offline reference cache: the reference model runs once, training reads its outputs.

Per pair (keyed by global example id) it stores summed reference log-probs and response
token counts of chosen and rejected (so DPO/IPO can run without a reference model), and,
for FPO, the pooled SAE features as sparse top-k_cache (index, value) pairs.

Layout (`cache.dir`):
    part-00000-of-00002.safetensors   rank r's rows: the pairs rank r trains on (epoch order)
    recipe.yaml                       the resolved recipe that built it
    manifest.json                     written last: fingerprint, parts, sha256 and row counts
    eval/                             with held-out pairs (data.eval_split / eval_fraction): the same
                                      layout for them, rank r holding held-out positions r, r+W, ...

The directory is built under `<dir>.partial` and renamed into place, so a crash never
leaves a directory that looks complete. This module defines the format and reads it; the
build (`fpo-ds build-cache`) lives in cache_build.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from fpo_ds import config as C
from fpo_ds import data, dist, integrity
from fpo_ds.data import Batch
from fpo_ds.model import RefOut

FORMAT = 1


def rebuild_hint() -> str:
    return "delete it and rebuild with: fpo-ds build-cache RECIPE (under torchrun/srun, like training)"


def _identity(name_or_path: str, revision: str | None = None) -> dict:
    """Hub id + revision; for a local directory, its config and weight files' names/sizes/mtimes."""
    ident = {"name_or_path": name_or_path, "revision": revision}
    p = Path(name_or_path)
    if p.is_dir():
        ident["files"] = {
            f.name: [f.stat().st_size, int(f.stat().st_mtime)]
            for f in sorted(p.iterdir())
            if f.suffix in (".json", ".safetensors", ".bin")
        }
    return ident


def fingerprints(recipe: C.Recipe, tokenizer, dataset_fingerprint: str) -> dict:
    """Hashes of everything that changes the cache's content: reference log-probs, and features."""
    r = recipe
    base = {
        "format": FORMAT,
        "model": _identity(r.model.name_or_path, r.model.revision),
        "tokenizer": data.tokenizer_digest(tokenizer),
        "data": dataset_fingerprint,  # the pairs' token ids: staging the data elsewhere keeps the cache
        "lengths": [r.data.max_length, r.data.max_prompt_length],
    }
    digest = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]  # noqa: E731
    out = {"logps": digest(base), "features": None}
    if has_features(r):
        sae = {
            "release": r.sae.release,
            "sae_id": r.sae.sae_id,
            "pooling": "mean-response",
            "k_cache": k_cache(r),
            "path": _identity(r.sae.path) if r.sae.path else None,
        }
        out["features"] = digest([base, sae])
    return out


def has_features(recipe: C.Recipe) -> bool:
    return bool(recipe.sae.path or recipe.sae.release)


def k_cache(recipe: C.Recipe) -> int:
    """Sparse entries kept per pooled feature vector (the rule lives here only: null means 4 * sae.k)."""
    return recipe.cache.k_cache or 4 * recipe.sae.k


# A row's approximation is "material" when the largest value it dropped exceeds this share of the
# smallest value it kept: the cache then misses a feature nearly as active as one it holds.
DROP_RATIO = 0.01


def approximation_note(manifest: dict) -> str | None:
    """One line on how much a finite k_cache dropped, from the manifest (None for a log-probs-only cache)."""
    a = manifest.get("approximation")
    if not a:
        return None
    return (
        f"cache approximation (k_cache {manifest['k_cache']}): {a['material_rows']} of {a['rows']} pooled feature "
        f"vectors ({100 * a['material_share']:.2f}%) dropped a value above {100 * DROP_RATIO:.0f}% of their smallest "
        f"kept one; largest dropped value {a['max_dropped']:.4g}"
    )


EVAL_DIR = "eval"  # the held-out pairs' cache: a complete cache of its own inside cache.dir


def part_dir(cache_dir: Path, part: str) -> Path:
    """Where a data part's cache lives: cache.dir for the training pairs, cache.dir/eval for the held-out ones."""
    return cache_dir / EVAL_DIR if part == "eval" else cache_dir


def part_name(rank: int, world: int) -> str:
    return f"part-{rank:05d}-of-{world:05d}.safetensors"


def rank_positions(n: int, recipe: C.Recipe, rank: int, world: int) -> list[int]:
    """Pair positions rank `rank` holds in the cache: those it trains over one epoch, then its share of the rest.

    The rest (fewer pairs than one global batch) is never trained at this batch size, but a resume
    with another global batch trains it (data.Order continues in pair positions), so the cache
    holds every pair. Ranks' counts then differ by at most one.
    """
    order = data.Order(n, recipe.data.seed, recipe.train.global_batch_size)
    trained = [i for s in range(order.steps_per_epoch) for i in order.positions(s, rank, world)]
    rest = order.rest_of_epoch()[0][order.steps_per_epoch * order.global_batch :]
    return trained + list(rest[rank::world])


class Reader:
    """Rank-local view of the cache: loads only the parts holding this rank's pairs.

    `features`: the objective reads the cached SAE features (objective.Objective.needs_features).
    """

    def __init__(
        self, recipe: C.Recipe, tokenizer, dataset_fingerprint: str, device="cpu", part: str = "train",
        features: bool = False,
    ):  # fmt: skip
        self.dir, self.device = part_dir(Path(recipe.cache.dir), part), device
        manifest_path = self.dir / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"cache.dir: {manifest_path} is missing (cache not built or incomplete); {rebuild_hint()}"
            )
        self.manifest = json.loads(manifest_path.read_text())
        want = fingerprints(recipe, tokenizer, dataset_fingerprint)
        have = self.manifest.get("fingerprints", {})
        if have.get("logps") != want["logps"]:
            raise ValueError(
                f"cache {self.dir} was built for a different model, tokenizer, dataset or max lengths "
                f"(fingerprint {have.get('logps')} != {want['logps']} for this recipe); {rebuild_hint()}"
            )
        self.features = features
        if self.features and have.get("features") != want["features"]:
            raise ValueError(
                f"cache {self.dir} holds features of a different SAE, pooling or k_cache than this recipe's "
                f"(sae {recipe.sae.release or recipe.sae.path} {recipe.sae.sae_id or ''}, k_cache {k_cache(recipe)}); "
                f"{rebuild_hint()}"
            )
        self.rows: dict[int, tuple[int, int]] = {}  # example id -> (table, row)
        if self.features and approximation_note(self.manifest):
            dist.log(approximation_note(self.manifest))
        self.tables: list[dict[str, torch.Tensor]] = []
        mine = (self.manifest["world_size"], self.manifest["global_batch_size"], self.manifest["data_seed"]) == (
            dist.world_size(),
            recipe.train.global_batch_size,
            recipe.data.seed,
        )
        for part in [self.manifest["parts"][dist.rank()]] if mine else self.manifest["parts"]:
            self._load(part)

    def _load(self, part: dict) -> None:
        path = self.dir / part["file"]
        if not path.is_file():
            raise FileNotFoundError(f"cache part {path} is missing; {rebuild_hint()}")
        if path.stat().st_size != part.get("bytes", path.stat().st_size) or integrity.sha256(path) != part["sha256"]:
            raise ValueError(f"cache part {path} is truncated or corrupted (size/sha256 mismatch); {rebuild_hint()}")
        table = load_file(str(path))
        if self.features and "feat_idx" not in table:
            raise ValueError(f"cache part {path} has no SAE features (built without an SAE); {rebuild_hint()}")
        t = len(self.tables)
        self.tables.append(table)
        for i, ex in enumerate(table["example_id"].tolist()):
            self.rows[ex] = (t, i)

    def __call__(self, batch: Batch) -> RefOut:
        return self.ref_out(batch.example_ids)

    def ref_out(self, example_ids: torch.Tensor) -> RefOut:
        """(b,) example ids -> RefOut over (chosen rows; rejected rows), shape (2b, ...)."""
        try:
            where = [self.rows[i] for i in example_ids.tolist()]
        except KeyError as e:
            raise KeyError(f"example id {e.args[0]} is not in cache {self.dir}; {rebuild_hint()}") from None

        def column(key: str) -> torch.Tensor:  # (b, 2, ...) -> (2b, ...) chosen rows then rejected rows
            x = torch.stack([self.tables[t][key][i] for t, i in where])
            return torch.cat([x[:, 0], x[:, 1]]).to(self.device, non_blocking=True)

        s, n = column("sum_logps"), column("n_tokens").to(torch.float32)
        if not self.features:
            return RefOut(s, s / n)
        return RefOut(s, s / n, None, column("feat_idx").long(), column("feat_val"))


if __name__ == "__main__":  # the build moved to cache_build: refuse, instead of exiting 0 having done nothing
    raise SystemExit("fpo_ds.cache reads caches only; build one with `fpo-ds build-cache RECIPE` (fpo_ds.cache_build)")
