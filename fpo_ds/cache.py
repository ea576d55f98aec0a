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


def _model_identity(model_cfg) -> dict:
    """Model id + revision; for a local directory, its config and weight files' names/sizes/mtimes."""
    ident = {"name_or_path": model_cfg.name_or_path, "revision": model_cfg.revision}
    p = Path(model_cfg.name_or_path)
    if p.is_dir():
        ident["files"] = {
            f.name: [f.stat().st_size, int(f.stat().st_mtime)]
            for f in sorted(p.iterdir())
            if f.suffix in (".json", ".safetensors", ".bin")
        }
    return ident


def fingerprint(recipe: C.Recipe, tokenizer, dataset_fingerprint: str) -> str:
    """Hash of everything that changes the cache's content."""
    r = recipe
    k_cache = r.cache.k_cache or 4 * r.sae.k
    parts = {
        "format": FORMAT,
        "model": _model_identity(r.model),
        "tokenizer": hashlib.sha256(
            (json.dumps(tokenizer.get_vocab(), sort_keys=True) + str(tokenizer.chat_template)).encode()
        ).hexdigest(),
        "data": [r.data.path, r.data.split, r.data.max_samples, r.data.on_bad_row, dataset_fingerprint],
        "lengths": [r.data.max_length, r.data.max_prompt_length],
        "features": None
        if r.loss.method != "fpo"
        else {"release": r.sae.release, "sae_id": r.sae.sae_id, "path": r.sae.path, "pooling": "mean", "k_cache": k_cache},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def part_name(rank: int, world: int) -> str:
    return f"part-{rank:05d}-of-{world:05d}.safetensors"


def rank_positions(n: int, recipe: C.Recipe, rank: int, world: int) -> list[int]:
    """Pair positions rank `rank` trains on over one epoch (the sampler's own assignment)."""
    t = recipe.train
    steps = n // t.global_batch_size
    return [i for s in range(steps) for i in data.step_indices(n, recipe.data.seed, s, t.global_batch_size, rank, world)]


# ----------------------------------------------------------------------------- build


def build(recipe: C.Recipe) -> Path:
    """Collective: every rank runs the reference over its own shard and writes its part."""
    import deepspeed

    dist.init(recipe.deepspeed.timeout_minutes)
    rank, world = dist.rank(), dist.world_size()
    final = Path(recipe.cache.dir)
    if final.exists():
        raise FileExistsError(
            f"cache.dir: {final} already exists; delete it (or pick another cache.dir) to rebuild"
        )
    tmp = final.with_name(final.name + ".partial")
    t = recipe.train
    ds_cfg = M.deepspeed_config(recipe.deepspeed.config, t.global_batch_size, t.micro_batch_size, world)
    tok = M.load_tokenizer(recipe.model)
    pairs, data_fp = data.load_pairs(recipe.data, tok, log=dist.log)
    positions = rank_positions(len(pairs), recipe, rank, world)
    ref_model, keep = M.load_model(recipe.model, ds_cfg)
    ref_model.requires_grad_(False)
    infer_cfg = {k: v for k, v in ds_cfg.items() if k != "gradient_clipping"}
    engine, *_ = deepspeed.initialize(model=ref_model, config=infer_cfg)
    engine.eval()
    del keep
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    tdist.barrier()
    ids, sums, counts = [], [], []
    mb = t.micro_batch_size
    with torch.no_grad():
        for i in range(0, len(positions), mb):
            batch = data.collate([pairs[j] for j in positions[i : i + mb]], tok.pad_token_id)
            out = M.sequence_logps(engine, batch)
            b = batch.example_ids.shape[0]
            ids.append(batch.example_ids)
            sums.append(torch.stack([out.sum_logps[:b], out.sum_logps[b:]], 1).float().cpu())
            counts.append(torch.stack([out.n_tokens[:b], out.n_tokens[b:]], 1).int().cpu())
            if rank == 0 and (i // mb) % 50 == 0:
                dist.log(f"build-cache: {i + b}/{len(positions)} pairs on rank 0")
    tensors = {"example_id": torch.cat(ids), "sum_logps": torch.cat(sums), "n_tokens": torch.cat(counts)}
    name = part_name(rank, world)
    save_file(tensors, str(tmp / name))
    entry = {"file": name, "rows": len(positions), "sha256": _sha256(tmp / name)}
    entries = [None] * world
    tdist.all_gather_object(entries, entry)
    if rank == 0:
        C.dump(recipe, tmp / "recipe.yaml")
        manifest = {
            "format": FORMAT,
            "fingerprint": fingerprint(recipe, tok, data_fp),
            "world_size": world,
            "global_batch_size": t.global_batch_size,
            "data_seed": recipe.data.seed,
            "n_pairs": len(pairs),
            "parts": entries,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, final)
        dist.log(f"build-cache: wrote {sum(e['rows'] for e in entries)} pairs in {world} parts to {final}")
    tdist.barrier()
    return final


# ----------------------------------------------------------------------------- read


class Reader:
    """Rank-local view of the cache: loads only the parts holding this rank's pairs."""

    def __init__(self, recipe: C.Recipe, tokenizer, dataset_fingerprint: str):
        self.dir = Path(recipe.cache.dir)
        manifest_path = self.dir / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"cache.dir: {manifest_path} is missing (cache not built or incomplete); {rebuild_hint()}")
        self.manifest = json.loads(manifest_path.read_text())
        want = fingerprint(recipe, tokenizer, dataset_fingerprint)
        if self.manifest.get("fingerprint") != want:
            raise ValueError(
                f"cache {self.dir} was built for a different model/tokenizer/data/lengths/SAE "
                f"(fingerprint {self.manifest.get('fingerprint')} != {want} for this recipe); {rebuild_hint()}"
            )
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        mine = self.manifest["world_size"] == dist.world_size() and (
            self.manifest["global_batch_size"] == recipe.train.global_batch_size
            and self.manifest["data_seed"] == recipe.data.seed
        )
        parts = [self.manifest["parts"][dist.rank()]] if mine else self.manifest["parts"]
        for part in parts:
            self._load(part)

    def _load(self, part: dict) -> None:
        path = self.dir / part["file"]
        if not path.is_file():
            raise FileNotFoundError(f"cache part {path} is missing; {rebuild_hint()}")
        if _sha256(path) != part["sha256"]:
            raise ValueError(f"cache part {path} is corrupted (sha256 mismatch); {rebuild_hint()}")
        t = load_file(str(path))
        for i, ex in enumerate(t["example_id"].tolist()):
            self.rows[ex] = (t["sum_logps"][i], t["n_tokens"][i])

    def ref_out(self, example_ids: torch.Tensor) -> RefOut:
        """(b,) example ids -> RefOut over (chosen rows; rejected rows), shape (2b,)."""
        try:
            got = [self.rows[i] for i in example_ids.tolist()]
        except KeyError as e:
            raise KeyError(f"example id {e.args[0]} is not in cache {self.dir}; {rebuild_hint()}") from None
        sums = torch.stack([g[0] for g in got])  # (b, 2)
        counts = torch.stack([g[1] for g in got]).to(sums.dtype)
        s, n = torch.cat([sums[:, 0], sums[:, 1]]), torch.cat([counts[:, 0], counts[:, 1]])
        return RefOut(s, s / n)


def main(argv: list[str] | None = None) -> None:
    """`fpo-ds build-cache RECIPE [key=value ...]` (run under the same launcher as training)."""
    import argparse

    p = argparse.ArgumentParser(prog="fpo-ds build-cache", description="build the offline reference cache")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    build(C.load(args.recipe, args.overrides))


if __name__ == "__main__":
    main()
