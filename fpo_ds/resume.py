"""Resume, decided once: which checkpoint a run continues from, in which form, with which recipe changes.

`plan(recipe)` runs once, on every rank, under the run lock and before anything is loaded: it
finds the tag (output.resume), reads its COMPLETE.json once (sizes), checks every file's sha256
(the reading spread over the ranks; a damaged tag is named and, under output.resume=auto, passed
over for the newest intact one, as a missing `latest` is), refuses a recipe change that alters
the run's meaning, and converts a checkpoint saved by another world size to DeepSpeed's
universal form (keyed by the tag's checksums, so a rewritten tag is converted again). Every rank
gets the same ResumePlan; the trainer logs it once (`describe`), and the engine builder and the
loader only read it. `data_order` then continues the checkpoint's data order, where it stood.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fpo_ds import checkpoint, data, dist
from fpo_ds import config as C


@dataclass(frozen=True)
class ResumePlan:
    """What a run continues from; a fresh run is `ResumePlan()`."""

    tag: Path | None = None  # the checkpoint's tag directory; None: start from the recipe's model
    load_from: Path | None = None  # what the engine loads: the tag, or its universal conversion
    converted: bool = False  # saved by another world size: loaded from the universal form
    saved_world: int = 0  # the world size that wrote the checkpoint
    step: int = 0  # optimizer steps the checkpoint holds
    changes: dict[str, tuple] = field(default_factory=dict)  # recipe keys changed and applied: (old, new)
    allowed: tuple[str, ...] = ()  # of those, the ones output.resume_allow_changes accepted
    deepspeed_config: dict | None = None  # the run's resolved DeepSpeed config (deepspeed.config=auto)
    notes: tuple[str, ...] = ()  # how the tag was found, when not simply by `latest`
    data_fingerprint: str | None = None  # of the pairs the checkpoint trained on (None: saved before it was kept)
    data_order: dict | None = None  # where the data order stood at the save (data.Order.state)
    data_start: int = 0  # saves without data_order: the step at which the data set's order began

    def describe(self) -> list[str]:
        """The lines the trainer logs, once."""
        if self.tag is None:
            return list(self.notes)
        form = f" in its universal form {self.load_from}" if self.converted else ""
        lines = [*self.notes, f"resume: continuing {self.tag.name} (saved by {self.saved_world} ranks){form}"]
        for key, (old, new) in self.changes.items():
            why = " (allowed by output.resume_allow_changes)" if key in self.allowed else ""
            lines.append(f"resume: {key} changed {old!r} -> {new!r}{why}; applied from step {self.step + 1}")
        return lines


# Keys a resume may change: they alter how the run proceeds, not what it means. Everything else
# (model, data, SAE, loss, global batch, seeds, optimizer and DeepSpeed settings) is refused unless
# output.resume_allow_changes names it.
SAFE_TO_CHANGE = {
    "train.lr", "train.warmup_steps", "train.schedule", "train.max_steps", "train.epochs",
    "train.micro_batch_size", "train.max_nonfinite_steps", "deepspeed.timeout_minutes", "sae.shard_group",
    "cache.dir", "model.gradient_checkpointing", "model.attn_implementation", "model.zero_init",
}  # fmt: skip
SAFE_SECTIONS = ("logging.", "output.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_changes(old: dict, new: dict) -> tuple[dict, dict]:
    """(refused, applied) changes between a checkpoint's recipe and this one: {dotted key: (old, new)}."""
    a, b = _flat(old), _flat(new)
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k in a and k in b and a[k] != b[k]}
    safe = {k: v for k, v in changed.items() if k in SAFE_TO_CHANGE or k.startswith(SAFE_SECTIONS)}
    return {k: v for k, v in changed.items() if k not in safe}, safe


def _changes(tag_dir: Path, recipe: C.Recipe) -> tuple[dict, tuple[str, ...]]:
    """Refuse a resume whose recipe changes the run's meaning; return (the changes applied, the allowed ones)."""
    import yaml

    saved = tag_dir / "recipe.yaml"
    if not saved.is_file():
        return {}, ()
    refused, applied = recipe_changes(yaml.safe_load(saved.read_text()) or {}, C.to_dict(recipe))
    allowed = {k: v for k, v in refused.items() if k in recipe.output.resume_allow_changes}
    refused = {k: v for k, v in refused.items() if k not in allowed}
    if refused:
        lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ValueError(
            f"output.dir: resuming {tag_dir} with a recipe that changes what the run means ({lines}). Mixing them "
            "in one run would be silent. Restore those values, start a new run (another output.dir), or accept "
            f"the change with output.resume_allow_changes=[{','.join(refused)}]"
        )
    return dict(sorted({**applied, **allowed}.items())), tuple(sorted(allowed))


def find(output_cfg, damaged: tuple[str, ...] = ()) -> tuple[Path | None, tuple[str, ...]]:
    """The tag directory to resume from, per output.resume (auto | never | path), and a note on how it was found.

    `damaged`: tags whose files failed their checksums; auto passes over them.
    """
    if output_cfg.resume == "never":
        return None, ()
    if output_cfg.resume != "auto":
        p = Path(output_cfg.resume)
        if not p.is_dir():
            raise FileNotFoundError(f"output.resume: {p} is not a checkpoint directory")
        return p, ()
    ckpt_root = checkpoint.root(output_cfg.dir)
    latest = ckpt_root / "latest"
    tags = [t for t in checkpoint.complete_tags(ckpt_root) if t not in damaged]
    if latest.is_file():
        named = ckpt_root / latest.read_text().strip()
        if (named / checkpoint.MARKER).is_file() and named.name not in damaged:
            return named, ()
        if tags and named.name not in damaged:
            note = f"{latest} names {named.name}, which is missing or incomplete; resuming from {tags[-1]} instead"
            return ckpt_root / tags[-1], (note,)
    return (ckpt_root / tags[-1], ()) if tags else (None, ())


def _saved_deepspeed_config(out_dir: str) -> dict | None:
    """The DeepSpeed config the run recorded in run_info.json (what deepspeed.config=auto chose)."""
    info = Path(out_dir) / "run_info.json"
    return json.loads(info.read_text()).get("deepspeed_config") if info.is_file() else None


def plan(recipe: C.Recipe) -> ResumePlan:
    """Collective, under the run lock, before anything loads: the ResumePlan, the same on every rank.

    Rank 0 finds the tag and reads its marker (a user error is printed once, by rank 0); every
    rank checks its share of the files' checksums; rank 0 then weighs the recipe changes and
    converts the checkpoint when the world size changed.
    """
    damaged: tuple[str, ...] = ()  # tag names passed over
    whys: tuple[str, ...] = ()  # what is wrong with each of them
    notes: tuple[str, ...] = ()
    while True:
        tag, found, info, problem = dist.from_rank0(dist.on_rank0(functools.partial(_find_and_read, recipe, damaged)))
        notes += found
        if tag is None and damaged:
            message = (
                f"output.dir: every checkpoint of {recipe.output.dir} is damaged ({'; '.join(whys)}). Restore one, or "
                "start again with output.resume=never output.overwrite=true (the old run is moved aside)"
            )
            dist.on_rank0(functools.partial(_refuse, message))
        if tag is None:
            return ResumePlan(notes=notes)
        if problem is None:
            bad = checkpoint.damaged_files(tag, info)
            problem = f"{', '.join(bad[:3])} no longer match(es) the sha256 recorded at save" if bad else None
        if problem is None:
            break
        what = f"checkpoint {tag} is damaged: {problem}"
        if recipe.output.resume != "auto":
            dist.on_rank0(functools.partial(_refuse, f"output.resume: {what}. Point it at another checkpoint"))
        damaged, whys = damaged + (tag.name,), whys + (what,)
        notes += (f"{what}; passing over {tag.name} for the newest intact checkpoint",)
    return dist.from_rank0(dist.on_rank0(lambda: _decide(recipe, tag, info, notes)))


def _refuse(message: str):
    raise ValueError(message)


def _find_and_read(recipe: C.Recipe, damaged: tuple[str, ...]):
    """Rank 0: the tag, how it was found, its marker (the one read of its file list) and what is wrong with it.

    A tag without its marker, or with a file missing or of another size, is damaged, as one
    whose checksums differ is.
    """
    tag, notes = find(recipe.output, damaged)
    if tag is None:
        return None, notes, None, None
    return tag, notes, *checkpoint.read_marker(tag)


def _decide(recipe: C.Recipe, tag: Path, info: dict, notes: tuple[str, ...]) -> ResumePlan:
    """Rank 0: the recipe's changes (a refused one raises) and the form the engine loads (converting if needed)."""
    saved_world = int(info.get("world_size", dist.world_size()))
    changes, allowed = _changes(tag, recipe)
    converted = checkpoint.partitioned(tag) and saved_world != dist.world_size()
    load_from = to_universal(tag, saved_world, checkpoint.identity(info)) if converted else tag
    ds = _saved_deepspeed_config(recipe.output.dir)
    data_fp, order, data_start = info.get("data_fingerprint"), info.get("data_order"), int(info.get("data_start") or 0)
    step = int(info["step"])
    return ResumePlan(
        tag, load_from, converted, saved_world, step, changes, allowed, ds, notes, data_fp, order, data_start
    )


DATA_CHANGE = "data.content"  # the output.resume_allow_changes entry that accepts another data set


def data_order(plan: ResumePlan, fingerprint: str, n_pairs: int, recipe: C.Recipe) -> data.Order:
    """The run's data order: a fresh one, the checkpoint's continued, or a new one for an allowed new data set.

    A data set whose fingerprint differs from the checkpoint's is refused unless
    output.resume_allow_changes names data.content; then its own epoch order starts here. An
    allowed change of train.global_batch_size continues the checkpoint's order at the pair it
    stood at: the rest of the epoch is trained once, in batches of the new size.
    """
    t, seed = recipe.train, recipe.data.seed
    if plan.tag is None:
        return data.Order(n_pairs, seed, t.global_batch_size)
    samples = (plan.data_order or {}).get("samples_before", plan.step * _saved_batch(plan, t))
    if plan.data_fingerprint not in (None, fingerprint):
        what = f"the data set changed since {plan.tag.name} (fingerprint {plan.data_fingerprint} -> {fingerprint})"
        if DATA_CHANGE not in recipe.output.resume_allow_changes:
            raise ValueError(
                f"output.dir: resuming with another data set: {what}. Continuing the old order over other rows would "
                "silently repeat some pairs and skip others. Restore the data, start a new run (another output.dir), "
                f"or accept it with output.resume_allow_changes=[{DATA_CHANGE}]: the new data set then starts its own "
                f"epoch order at step {plan.step + 1}"
            )
        dist.log(f"resume: {what}, allowed by output.resume_allow_changes: a new epoch order over its {n_pairs} "
                 f"pairs starts at step {plan.step + 1}")  # fmt: skip
        return data.Order(n_pairs, seed, t.global_batch_size, plan.step, samples_before=samples)
    if "data.seed" in plan.changes:
        dist.log(
            f"resume: data.seed changed: a new epoch order over the {n_pairs} pairs starts at step {plan.step + 1}"
        )
        return data.Order(n_pairs, seed, t.global_batch_size, plan.step, samples_before=samples)
    saved = plan.data_order or _legacy_state(plan, n_pairs, seed, _saved_batch(plan, t))
    order = data.Order(**{**saved, "global_batch": t.global_batch_size})
    if saved["global_batch"] != t.global_batch_size:
        seq, left = order.rest_of_epoch()
        dropped = len(seq) - order.offset - left * t.global_batch_size
        dropped = f"; its last {dropped} pairs are left out (fewer than a global batch)" if dropped else ""
        dist.log(
            f"resume: train.global_batch_size {saved['global_batch']} -> {t.global_batch_size}: the data order "
            f"continues at pair {order.offset} of {len(seq)} in epoch {order.epoch} "
            f"({order.epochs_done(plan.step):.4g} epochs done); {left} step(s) of {t.global_batch_size} pairs finish "
            f"that epoch{dropped}"
        )
    return order


def _saved_batch(plan: ResumePlan, t) -> int:
    """The global batch the checkpoint trained with."""
    return int(plan.changes.get("train.global_batch_size", (t.global_batch_size,))[0])


def _legacy_state(plan: ResumePlan, n_pairs: int, seed: int, batch: int) -> dict:
    """The order's state for a checkpoint saved before data_order was kept: steps since data_start, one batch size."""
    per_epoch = n_pairs // batch
    epoch, k = divmod(plan.step - plan.data_start, per_epoch)
    return {"n": n_pairs, "seed": seed, "global_batch": batch, "start_step": plan.step, "epoch": epoch,
            "offset": k * batch, "epoch_block": batch, "samples_before": plan.step * batch}  # fmt: skip


def universal_dir(tag_dir: Path) -> Path:
    """Where a checkpoint's world-size-free (DeepSpeed universal) form lives: checkpoints/universal/<tag>."""
    return tag_dir.parent / "universal" / tag_dir.name


def to_universal(tag_dir: Path, saved_world: int, key: str) -> Path:
    """Rank 0: convert a checkpoint for another world size with DeepSpeed's ds_to_universal (once per `key`).

    ZeRO partitions the optimizer state by rank; the universal form stores it per parameter, so any
    world size can load it (the `checkpoint.load_universal` DeepSpeed setting). `key`
    (checkpoint.identity) names the tag's content: a conversion of an earlier save of the same tag
    is stale and is made again.
    """
    import subprocess
    import sys

    out = universal_dir(tag_dir)
    if (out / checkpoint.MARKER).is_file():
        stale = _stale_conversion(out, key)
        if stale is None:
            return out
        dist.log(f"resume: {out} {stale}; converting it again")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    dist.log(f"resume: {tag_dir.name} was saved by {saved_world} ranks; converting it for {dist.world_size()}")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise ValueError(
            f"output.dir: {tag_dir} was saved by {saved_world} ranks and could not be converted for "
            f"{dist.world_size()} ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no message'}). "
            f"Resume with {saved_world} ranks, or convert by hand: {' '.join(cmd)}"
        )
    sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    marker = {"from": str(tag_dir), "world_size": saved_world, "source": key, "files": sizes}
    checkpoint.atomic_write(tmp / checkpoint.MARKER, json.dumps(marker))
    os.replace(tmp, out)
    return out


def _stale_conversion(out: Path, key: str) -> str | None:
    """Why a finished conversion cannot be reused (None: it can): another save of the tag, or a file lost or resized.

    The conversion is derived from a checksummed tag, so sizes (cheap) are what is checked here.
    """
    try:
        marker = json.loads((out / checkpoint.MARKER).read_text())
        source, sizes = marker.get("source"), marker.get("files")
        sizes = None if sizes is None else dict(sizes)
    except (ValueError, TypeError, AttributeError) as e:
        return f"has an unreadable {checkpoint.MARKER} ({type(e).__name__})"
    if source != key:
        return f"converts an earlier save of {out.name}"
    if sizes is None:
        return "was made before conversions recorded their file sizes"
    for rel, size in sizes.items():
        f = out / rel
        if not f.is_file() or f.stat().st_size != size:
            return f"is damaged: {rel} is {f.stat().st_size if f.is_file() else 'missing'} (expected {size} bytes)"
    return None
