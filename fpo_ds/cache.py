"""Offline reference cache: the reference model runs once, training reads its outputs.

Per pair (keyed by global example id) it stores summed reference log-probs and response
token counts of chosen and rejected (so DPO/IPO can run without a reference model), and,
for FPO, the pooled SAE features as sparse top-k_cache (index, value) pairs.

Layout (`cache.dir`):
    part-00000-of-00002.safetensors   rank r's rows: the pairs rank r trains on (epoch order)
    recipe.yaml                       the resolved recipe that built it
    manifest.json                     written last: fingerprint, parts, sha256 and row counts

The directory is built under `<dir>.partial` and renamed into place, so a crash never
leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file

from fpo_ds import config as C
from fpo_ds import data, dist
from fpo_ds import model as M
from fpo_ds.objective import RefOut

FORMAT = 1


def rebuild_hint() -> str:
    return "delete it and rebuild with: fpo-ds build-cache RECIPE (under torchrun/srun, like training)"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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
        "tokenizer": hashlib.sha256(
            (json.dumps(tokenizer.get_vocab(), sort_keys=True) + str(tokenizer.chat_template)).encode()
        ).hexdigest(),
        "data": [r.data.path, r.data.split, r.data.max_samples, r.data.on_bad_row, dataset_fingerprint],
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
    return recipe.cache.k_cache or 4 * recipe.sae.k


def part_name(rank: int, world: int) -> str:
    return f"part-{rank:05d}-of-{world:05d}.safetensors"


def rank_positions(n: int, recipe: C.Recipe, rank: int, world: int) -> list[int]:
    """Pair positions rank `rank` trains on over one epoch (the sampler's own assignment)."""
    t = recipe.train
    steps = n // t.global_batch_size
    return [
        i for s in range(steps) for i in data.step_indices(n, recipe.data.seed, s, t.global_batch_size, rank, world)
    ]


# ----------------------------------------------------------------------------- build


def _sparse(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, d_sae) -> top-k (idx int32, val f32) with -1 for non-positive entries, and the largest dropped value."""
    top = features.float().topk(min(k + 1, features.shape[1]), dim=1)
    vals, idx = top.values[:, :k], top.indices[:, :k]
    dropped = top.values[:, k] if top.values.shape[1] > k else torch.zeros(features.shape[0], device=features.device)
    idx = torch.where(vals > 0, idx, torch.full_like(idx, -1))
    pad = k - vals.shape[1]  # an SAE narrower than k_cache
    if pad > 0:
        vals = torch.nn.functional.pad(vals, (0, pad))
        idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
    return idx.int(), torch.where(idx >= 0, vals, torch.zeros_like(vals)), dropped.clamp(min=0)


def _pair_rows(x: torch.Tensor) -> torch.Tensor:
    """(2b, ...) chosen rows then rejected rows -> (b, 2, ...)."""
    b = x.shape[0] // 2
    return torch.stack([x[:b], x[b:]], 1)


def build(recipe: C.Recipe) -> Path:
    """Collective: every rank runs the reference over its own shard and writes its part."""
    from deepspeed.accelerator import get_accelerator

    dist.init(recipe.deepspeed.timeout_minutes)
    rank, world = dist.rank(), dist.world_size()
    final = Path(recipe.cache.dir)
    if final.exists():
        raise FileExistsError(f"cache.dir: {final} already exists; delete it (or pick another cache.dir) to rebuild")
    tmp = final.with_name(final.name + ".partial")
    t, device = recipe.train, get_accelerator().current_device_name()
    ds_cfg = M.deepspeed_config(recipe.deepspeed.config, t.global_batch_size, t.micro_batch_size, world)
    tok = M.load_tokenizer(recipe.model.name_or_path, recipe.model.revision)
    pairs, data_fp = data.load_pairs(recipe.data, tok, log=dist.log)
    positions = rank_positions(len(pairs), recipe, rank, world)
    encoder = layer = None
    if has_features(recipe):  # sae-lens is imported before zero.Init
        from fpo_ds import sae

        encoder, layer = sae.sharded_encoder(recipe.sae, M.load_config(recipe.model), rank, world, device)
    engine = M.frozen_engine(recipe.model, ds_cfg)
    tap = M.ResidualTap(engine.module, layer) if encoder else None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    tdist.barrier()
    cols: dict[str, list] = {
        "example_id": [],
        "sum_logps": [],
        "n_tokens": [],
        "feat_idx": [],
        "feat_val": [],
        "feat_dropped_max": [],
    }
    mb = t.micro_batch_size
    t_start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(positions), mb):
            batch = M.to_device(data.collate([pairs[j] for j in positions[i : i + mb]], tok.pad_token_id), device)
            out = M.sequence_logps(engine, batch, tap=tap, encoder=encoder)
            cols["example_id"].append(batch.example_ids.cpu())
            cols["sum_logps"].append(_pair_rows(out.sum_logps.float()).cpu())
            cols["n_tokens"].append(_pair_rows(out.n_tokens.int()).cpu())
            if encoder:
                idx, val, dropped = _sparse(out.features, k_cache(recipe))
                cols["feat_idx"].append(_pair_rows(idx).cpu())
                cols["feat_val"].append(_pair_rows(val).cpu())
                cols["feat_dropped_max"].append(_pair_rows(dropped).cpu())
            if (i // mb) % 50 == 0:
                dist.log(f"build-cache: {i + mb}/{len(positions)} pairs on rank 0")
    seconds = time.perf_counter() - t_start  # the reference pass (forward, SAE, top-k), before writing
    tensors = {k: torch.cat(v) for k, v in cols.items() if v}
    name = part_name(rank, world)
    save_file(tensors, str(tmp / name))
    entry = {"file": name, "rows": len(positions), "sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    entries = [None] * world
    tdist.all_gather_object(entries, entry)
    if rank == 0:
        C.dump(recipe, tmp / "recipe.yaml")
        manifest = {
            "format": FORMAT,
            "fingerprints": fingerprints(recipe, tok, data_fp),
            "k_cache": k_cache(recipe) if encoder else None,
            "world_size": world,
            "global_batch_size": t.global_batch_size,
            "data_seed": recipe.data.seed,
            "n_pairs": len(pairs),
            "build_seconds": seconds,
            "parts": entries,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, final)
        rows = sum(e["rows"] for e in entries)
        size = sum(e["bytes"] for e in entries)
        dist.log(f"build-cache: wrote {rows} pairs in {world} parts to {final} ({size / max(rows, 1):.0f} bytes/pair)")
    tdist.barrier()
    if tap:
        tap.remove()
    return final


# ----------------------------------------------------------------------------- read


class Reader:
    """Rank-local view of the cache: loads only the parts holding this rank's pairs."""

    def __init__(self, recipe: C.Recipe, tokenizer, dataset_fingerprint: str, device="cpu"):
        self.dir, self.device = Path(recipe.cache.dir), device
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
        self.features = recipe.loss.method == "fpo"
        if self.features and have.get("features") != want["features"]:
            raise ValueError(
                f"cache {self.dir} holds features of a different SAE, pooling or k_cache than this recipe's "
                f"(sae {recipe.sae.release or recipe.sae.path} {recipe.sae.sae_id or ''}, k_cache {k_cache(recipe)}); "
                f"{rebuild_hint()}"
            )
        self.rows: dict[int, tuple[int, int]] = {}  # example id -> (table, row)
        self.read_seconds = 0.0  # time spent in ref_out since the trainer last read it
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
        if path.stat().st_size != part.get("bytes", path.stat().st_size) or _sha256(path) != part["sha256"]:
            raise ValueError(f"cache part {path} is truncated or corrupted (size/sha256 mismatch); {rebuild_hint()}")
        table = load_file(str(path))
        if self.features and "feat_idx" not in table:
            raise ValueError(f"cache part {path} has no SAE features (built without an SAE); {rebuild_hint()}")
        t = len(self.tables)
        self.tables.append(table)
        for i, ex in enumerate(table["example_id"].tolist()):
            self.rows[ex] = (t, i)

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


def main(argv: list[str] | None = None) -> None:
    """`fpo-ds build-cache RECIPE [key=value ...]` (run under the same launcher as training)."""
    import argparse

    p = argparse.ArgumentParser(prog="fpo-ds build-cache", description="build the offline reference cache")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    build(C.load(args.recipe, args.overrides))
    dist.shutdown(0)


if __name__ == "__main__":
    main()
