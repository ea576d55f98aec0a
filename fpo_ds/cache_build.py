"""`fpo-ds build-cache RECIPE [key=value ...]`: run the reference once, write the offline cache.

Run under the same launcher and world size as training: rank r runs the reference over the
pairs rank r will train on and writes its part (the format is described in cache.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as tdist
from safetensors.torch import save_file

from fpo_ds import cache, components, data, dist, features, integrity, metrics, rundir
from fpo_ds import config as C
from fpo_ds import model as M


def sparse(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def material_drops(val: torch.Tensor, dropped: torch.Tensor, ratio: float = cache.DROP_RATIO) -> torch.Tensor:
    """(rows, k) kept values (0: empty slot), (rows,) largest dropped -> (rows,) dropped > ratio * smallest kept."""
    kept = torch.where(val > 0, val, torch.full_like(val, float("inf"))).min(dim=1).values
    return (dropped > 0) & (dropped > ratio * kept)


def _pair_rows(x: torch.Tensor) -> torch.Tensor:
    """(2b, ...) chosen rows then rejected rows -> (b, 2, ...)."""
    b = x.shape[0] // 2
    return torch.stack([x[:b], x[b:]], 1)


def _approximation(cols: dict, device: str) -> dict:
    """Over all ranks: how many pooled vectors dropped a material value (collective)."""
    val, dropped = torch.cat(cols["feat_val"]).flatten(0, 1), torch.cat(cols["feat_dropped_max"]).flatten()
    stats = torch.tensor([dropped.numel(), material_drops(val, dropped).sum().item()], dtype=torch.float64)
    stats = stats.to(device)
    tdist.all_reduce(stats)
    top = (dropped.max() if dropped.numel() else torch.zeros(())).reshape(1).to(device)
    tdist.all_reduce(top, op=tdist.ReduceOp.MAX)
    rows, material = (int(x) for x in stats.tolist())
    share = material / max(rows, 1)
    return {"rows": rows, "material_rows": material, "material_share": share, "max_dropped": top.item()}


def build(recipe: C.Recipe) -> Path:
    """Collective: every rank runs the reference over its own shard and writes its part."""
    final = Path(recipe.cache.dir)
    dist.init(recipe.deepspeed.timeout_minutes)
    with rundir.exclusive(lambda: _claim(final)):
        return _build(recipe, final)


def _claim(final: Path):
    """Rank 0: one builder per cache directory, and never over a finished cache."""
    lock = rundir.claim(final, "cache.dir")
    if final.exists():
        lock.release()
        raise FileExistsError(f"cache.dir: {final} already exists; delete it (or pick another cache.dir) to rebuild")
    return lock


def _build(recipe: C.Recipe, final: Path) -> Path:
    c = components.build(recipe, "cache")
    rank, world, mb = dist.rank(), dist.world_size(), recipe.train.micro_batch_size
    tmp = final.with_name(final.name + ".partial")
    # Rows are keyed by example id, so each rank runs its pairs longest first: similar lengths pad together.
    lengths = [data.padded_length(p) for p in c.pairs]
    every = [cache.rank_positions(len(c.pairs), recipe, r, world) for r in range(world)]
    every = [sorted(ix, key=lambda i: (-lengths[i], i)) for ix in every]
    rounds = -(-max(len(ix) for ix in every) // mb)  # every rank runs as many micro-batches (-1 pads)
    every = [ix + [-1] * (rounds * mb - len(ix)) for ix in every]
    plan = [[ix[i : i + mb] for ix in every] for i in range(0, rounds * mb, mb)]
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    tdist.barrier()
    train_part = _reference_pass(c, c.pairs, plan, "build-cache")
    if data.has_eval(recipe.data):  # the held-out pairs' own cache, inside this one (cache.EVAL_DIR)
        _, pairs, fingerprint = components.load_data(recipe, "eval")
        held_out = _reference_pass(c, pairs, data.eval_plan(len(pairs), mb, world), "build-cache (held-out)")
        _write(recipe, c, cache.part_dir(tmp, "eval"), held_out, fingerprint, len(pairs))
    _write(recipe, c, tmp, train_part, c.data_fingerprint, len(c.pairs))
    if rank == 0:
        os.replace(tmp, final)
        dist.log(f"build-cache: {final} is complete")
    tdist.barrier()
    if c.features:
        c.features.close()
    return final


class Pass(NamedTuple):
    cols: dict[str, torch.Tensor]  # this rank's rows (example ids, log-probs, token counts, features)
    seconds: float  # the reference pass (forward, SAE, top-k), before writing
    approximation: dict | None  # over all ranks (FPO)


def _reference_pass(c, pairs: list[data.Pair], plan: list[list[list[int]]], label: str) -> Pass:
    """Collective: the reference over `plan` (micro-batch -> per-rank positions; -1 pads, never stored)."""
    rank, k = dist.rank(), cache.k_cache(c.recipe)
    names = ("example_id", "sum_logps", "n_tokens", "feat_idx", "feat_val", "feat_dropped_max")
    cols: dict[str, list] = {key: [] for key in names}
    t_start = time.perf_counter()
    total = sum(j >= 0 for positions in plan for j in positions[rank])
    progress, done = metrics.Progress(f"{label} (rank 0)", total, "pairs"), 0
    with torch.no_grad():
        for positions in plan:
            peers = [[pairs[max(j, 0)] for j in ix] for ix in positions]
            keep = torch.tensor([j >= 0 for j in positions[rank]])
            batch = M.to_device(data.collate(peers[rank], c.tokenizer.pad_token_id), c.device)
            fwd = features.forward(c.reference_model, batch, c.features, peers)
            out = fwd.out
            got = {
                "example_id": batch.example_ids.cpu(),
                "sum_logps": _pair_rows(out.sum_logps.float()).cpu(),
                "n_tokens": _pair_rows(out.n_tokens.int()).cpu(),
            }
            if c.features:
                idx, val, dropped = sparse(fwd.features, k)
                got.update(feat_idx=_pair_rows(idx), feat_val=_pair_rows(val), feat_dropped_max=_pair_rows(dropped))
            for key, value in got.items():
                cols[key].append(value.cpu()[keep])
            done += int(keep.sum())
            progress.update(done)
    seconds = time.perf_counter() - t_start
    approx = _approximation(cols, c.device) if c.features else None
    return Pass({key: torch.cat(v) for key, v in cols.items() if v}, seconds, approx)


def _write(recipe: C.Recipe, c, directory: Path, done: Pass, fingerprint: str, n_pairs: int) -> None:
    """Collective: every rank writes its part into `directory`; rank 0 then the recipe and the manifest (last)."""
    rank, world = dist.rank(), dist.world_size()
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    tdist.barrier()
    name = cache.part_name(rank, world)
    save_file(done.cols, str(directory / name))
    entry = {"file": name, "rows": int(done.cols["example_id"].shape[0]), "sha256": integrity.sha256(directory / name)}
    entry["bytes"] = (directory / name).stat().st_size
    entries = [None] * world
    tdist.all_gather_object(entries, entry)
    if rank == 0:
        _manifest(recipe, c, directory, entries, done, fingerprint, n_pairs)
    tdist.barrier()


def _manifest(recipe: C.Recipe, c, directory: Path, entries: list, done: Pass, fingerprint: str, n_pairs: int):
    """Rank 0: the recipe, then the manifest (written last)."""
    C.dump(recipe, directory / "recipe.yaml")
    manifest = {
        "format": cache.FORMAT,
        "fingerprints": cache.fingerprints(recipe, c.tokenizer, fingerprint),
        "k_cache": cache.k_cache(recipe) if c.features else None,
        "world_size": dist.world_size(),
        "global_batch_size": recipe.train.global_batch_size,
        "data_seed": recipe.data.seed,
        "n_pairs": n_pairs,
        "build_seconds": done.seconds,
        "approximation": done.approximation,
        "parts": entries,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    rows = sum(e["rows"] for e in entries)
    per_pair = sum(e["bytes"] for e in entries) / max(rows, 1)
    dist.log(f"build-cache: wrote {rows} pairs in {len(entries)} parts to {directory} ({per_pair:.0f} bytes/pair)")
    note = cache.approximation_note(manifest)
    if note:
        dist.log(note)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fpo-ds build-cache", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    dist.report_failures()
    build(C.load(args.recipe, args.overrides))
    dist.shutdown(0)


if __name__ == "__main__":
    main()
