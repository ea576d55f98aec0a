"""DeepSpeed checkpoints made atomic, resumable and exportable.

Layout under `output.dir/checkpoints/`:
    step_00000010/            DeepSpeed's files + rng_rank*.pt + hf/ (config, tokenizer)
                              + recipe.yaml + COMPLETE.json (written last: each file's size and sha256)
    latest                    tag of the newest complete checkpoint (replaced atomically)
    universal/step_00000010/  that tag converted for another world size (resume.py decides when)

A crash mid-save leaves a tag without COMPLETE.json and `latest` untouched. Which tag a run
continues from, and in which form, is resume.py's decision; `load` follows it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from fpo_ds import config as C
from fpo_ds import dist, faults, integrity

MARKER = "COMPLETE.json"


def root(out_dir: str) -> Path:
    return Path(out_dir) / "checkpoints"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save(engine, recipe, step: int, client_state: dict, model_config, tokenizer) -> Path:
    """Collective: every rank calls it. Returns the tag directory."""
    ckpt_root = root(recipe.output.dir)
    tag = tag_of(step)
    tag_dir = ckpt_root / tag
    if dist.rank() == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a leftover partial save of the same step
    tdist.barrier()
    adapters_only = recipe.model.lora.enabled  # the frozen base is the recipe's model, loaded again on resume
    try:
        engine.save_checkpoint(
            str(ckpt_root),
            tag=tag,
            client_state=client_state,
            save_latest=False,
            exclude_frozen_parameters=adapters_only,
        )
        torch.save(_rng_state(), tag_dir / f"rng_rank{dist.rank()}.pt")
        faults.maybe_die_in_save(step)
        tdist.barrier()  # every rank's files are written before the marker says so
        names = None
        if dist.rank() == 0:
            model_config.save_pretrained(tag_dir / "hf")
            tokenizer.save_pretrained(tag_dir / "hf")
            C.dump(recipe, tag_dir / "recipe.yaml")
            names = [str(p.relative_to(tag_dir)) for p in sorted(tag_dir.rglob("*")) if p.is_file()]
        names = dist.from_rank0(names)
        sums = integrity.checksums(tag_dir, names)  # the hashing is spread over the ranks
        if dist.rank() == 0:
            files = {n: {"bytes": (tag_dir / n).stat().st_size, "sha256": sums[n]} for n in names}
            info = {"step": step, "world_size": dist.world_size(), "files": files, "trainable_only": adapters_only}
            info |= {k: client_state.get(k) for k in ("data_fingerprint", "data_order")}  # resume checks the data
            atomic_write(tag_dir / MARKER, json.dumps(info))
            if adapters_only:
                total = sum(f["bytes"] for f in files.values()) / 2**20
                dist.log(
                    f"checkpoint {tag}: trainable state only (LoRA adapters, their optimizer states; the frozen base "
                    f"is {recipe.model.name_or_path}), {total:.2f} MiB"
                )
            atomic_write(ckpt_root / "latest", tag)
            _prune(ckpt_root, recipe.output.keep_last)
    except (OSError, RuntimeError) as e:
        good = complete_tags(ckpt_root)
        free = shutil.disk_usage(ckpt_root).free / 2**20
        raise OSError(
            f"saving checkpoint {tag_dir} failed on rank {dist.rank()} ({free:.1f} MiB free on that disk): {e}. "
            f"That directory has no {MARKER} and "
            f"is ignored; the newest complete checkpoint ({good[-1] if good else 'none'}) is intact. Free disk "
            "space (or move output.dir) and rerun: output.resume=auto continues from it"
        ) from None
    tdist.barrier()
    return tag_dir


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(ckpt_root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete tags; their universal conversions go with them."""
    tags = complete_tags(ckpt_root)
    for tag in tags[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(ckpt_root / tag, ignore_errors=True)
    kept = set(tags[-keep_last:]) if keep_last > 0 else set(tags)
    for converted in (ckpt_root / "universal").glob("step_*") if (ckpt_root / "universal").is_dir() else []:
        if converted.name.removesuffix(".partial") not in kept:
            shutil.rmtree(converted, ignore_errors=True)


def complete_tags(ckpt_root: Path) -> list[str]:
    """Tags with a COMPLETE marker, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p.parent.name for p in ckpt_root.glob(f"step_*/{MARKER}"))


def _expected(entry) -> tuple[int, str | None]:
    """A marker's file entry: (bytes, sha256); checkpoints saved before checksums hold the size alone."""
    return (entry, None) if isinstance(entry, int) else (entry["bytes"], entry["sha256"])


def verify(tag_dir: Path) -> dict:
    """The marker of a complete checkpoint; raises naming the missing or truncated file (sizes only: cheap)."""
    info, problem = read_marker(tag_dir)
    if problem is not None:
        raise ValueError(
            f"checkpoint {tag_dir} is damaged: {problem}. Delete {tag_dir} to resume from the previous checkpoint, "
            "or set output.resume=never"
        )
    return info


def read_marker(tag_dir: Path) -> tuple[dict | None, str | None]:
    """(the marker, None), or (None, what is wrong): no or unreadable marker, a file missing or of another size."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        return None, f"no {MARKER} (the save did not finish)"
    try:
        info = json.loads(marker.read_text())
        files = {rel: _expected(entry)[0] for rel, entry in info["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"its {MARKER} is unreadable ({type(e).__name__}: {e})"
    for rel, size in files.items():
        p = tag_dir / rel
        if not p.is_file():
            return None, f"{rel} is missing"
        if p.stat().st_size != size:
            return None, f"{rel} is {p.stat().st_size} bytes (expected {size})"
    return info, None


def damaged_files(tag_dir: Path, info: dict) -> list[str]:
    """Collective: the files whose sha256 differs from the one recorded at save (the reading is spread over ranks)."""
    want = {rel: _expected(entry)[1] for rel, entry in info["files"].items()}
    want = {rel: h for rel, h in want.items() if h is not None}
    got = integrity.checksums(tag_dir, sorted(want))
    return [rel for rel in sorted(want) if got[rel] != want[rel]]


def identity(info: dict) -> str:
    """A digest of a checkpoint's recorded files (names, sizes, checksums): a rewritten tag gets another one."""
    return hashlib.sha256(json.dumps(info["files"], sort_keys=True).encode()).hexdigest()[:20]


def partitioned(tag_dir: Path) -> bool:
    """Whether a checkpoint holds ZeRO-partitioned optimizer states (ZeRO 1-3), not one whole copy (stage 0)."""
    return any(tag_dir.glob("*zero_pp_rank_*"))


def load(engine, plan) -> dict:
    """Collective: restore engine (weights, optimizer, scheduler) and this rank's RNG; return client state.

    `plan` (resume.ResumePlan) says what to load: a checkpoint from another world size loads from
    its universal form (the engine is built with `checkpoint.load_universal`); on another world
    size the ranks' RNG streams start afresh.
    """
    src = plan.load_from
    # A LoRA run's checkpoint holds the trainable parameters only; the frozen base comes from model.name_or_path.
    frozen = any(not p.requires_grad for p in engine.module.parameters())
    _, client = engine.load_checkpoint(str(src.parent), tag=src.name, load_module_strict=not frozen)
    if client is None:
        raise ValueError(f"{plan.tag}: DeepSpeed could not load this checkpoint")
    rng = plan.tag / f"rng_rank{dist.rank()}.pt"
    if plan.saved_world == dist.world_size() and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return client


def export(tag_dir: str | Path, out: str | Path, dtype: str = "auto", form: str = "auto") -> Path:
    """ZeRO checkpoint -> Hugging Face directory (config, tokenizer, safetensors, model card). Single process.

    `form`: a full-parameter run exports its model ("auto" or "full"); a LoRA run (model.lora)
    exports a PEFT adapter directory ("auto" or "adapter", loads with PeftModel.from_pretrained on
    its base model) or the base with the adapters merged in ("merged", a plain model).
    """
    from transformers import AutoTokenizer

    tag_dir, out = Path(tag_dir), Path(out)
    _check_step_dir(tag_dir)
    verify(tag_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export: {out} exists and is not empty; pick a new directory")
    recipe = C.load(tag_dir / "recipe.yaml")
    lora_cfg = recipe.model.lora
    form = ("adapter" if lora_cfg.enabled else "full") if form == "auto" else form
    if lora_cfg.enabled == (form == "full"):
        forms = "adapter or merged" if lora_cfg.enabled else "full"
        raise ValueError(f"export: form {form!r} does not fit this checkpoint ({tag_dir}); use {forms}")
    state = _saved_state(tag_dir, trainable_only=lora_cfg.enabled)
    model = _full_model(tag_dir, state) if form == "full" else _adapted_model(recipe, state)
    if form == "merged":
        model = model.merge_and_unload()
    if dtype != "auto":
        model = model.to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(tag_dir / "hf")
    generation = model.get_base_model() if form == "adapter" else model
    stop_at_end_of_turn(generation.generation_config, tokenizer)
    model.save_pretrained(tmp, safe_serialization=True)
    if form == "adapter":
        generation.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    from fpo_ds import model_card, rundir

    step = json.loads((tag_dir / MARKER).read_text())["step"]
    model_card.write(tag_dir, tmp, step, rundir.versions(), form)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def _saved_state(tag_dir: Path, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 weights by name (a LoRA run's: its trainable parameters only)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if partitioned(tag_dir):
        return get_fp32_state_dict_from_zero_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, exclude_frozen_parameters=trainable_only
        )
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))  # stage 0: the module in DeepSpeed's model states
    if not files:
        raise FileNotFoundError(f"export: {tag_dir} has neither ZeRO partitions nor mp_rank_*_model_states.pt")
    module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items()}


def _full_model(tag_dir: Path, state: dict):
    """A full-parameter checkpoint as a Hugging Face model (fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tag_dir / "hf"), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"export: checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return model


def _adapted_model(recipe, state: dict):
    """A LoRA checkpoint: the recipe's base model (fp32) with PEFT's adapters, loaded from the checkpoint."""
    from fpo_ds import lora
    from fpo_ds import model as M

    base, _ = M.load_model(recipe.model, {"zero_optimization": {"stage": 0}})
    base.config.use_cache = True
    peft_model = lora.wrap(base.float(), recipe.model.lora)
    want = set(lora.trainable(base))
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise ValueError(
            f"export: the checkpoint's adapters do not match model.lora on {recipe.model.name_or_path}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    base.load_state_dict(state, strict=False)
    local = Path(recipe.model.name_or_path)
    if local.is_dir():  # the adapter names its base; a relative path would only resolve from this directory
        peft_model.peft_config["default"].base_model_name_or_path = str(local.resolve())
    return peft_model


def _check_step_dir(path: Path) -> None:
    """Refuse a missing path, or a run directory or its checkpoints/ where a step directory belongs, naming one."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"export: {path} does not exist; pass a checkpoint step directory, e.g. runs/NAME/checkpoints/{tag_of(10)}"
        )
    ckpt_root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if (path / MARKER).is_file() or not ((ckpt_root / "latest").is_file() or any(ckpt_root.glob("step_*"))):
        return
    tags = complete_tags(ckpt_root)
    what = "a run directory" if ckpt_root != path else "a run's checkpoints directory"
    if not tags:
        raise FileNotFoundError(
            f"export: {path} is {what}, not a checkpoint, and it holds no complete checkpoint "
            f"(no step_*/{MARKER}); let the run save one (output.save_every, or the end of training)"
        )
    raise FileNotFoundError(
        f"export: {path} is {what}, not a checkpoint; pass a step directory such as "
        f"{ckpt_root / tags[-1]} (complete checkpoints: {', '.join(tags)})"
    )


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids of the special tokens the chat template puts right after an assistant message (Gemma's <end_of_turn>).

    Found by rendering a one-turn conversation, so any template works (Llama 3's <|eot_id|>,
    ChatML's <|im_end|>); [] without a chat template or when the turn ends in plain text.
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    marker = "fpo-ds-answer"
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(turn, tokenize=False)
    except Exception:  # any template error (jinja2 or the template raising): no stop token
        return []
    after = text[text.rfind(marker) + len(marker) :].lstrip()
    special = sorted(tokenizer.get_added_vocab().items(), key=lambda kv: -len(kv[0]))
    return [i for tok, i in special if after.startswith(tok)][:1]


def stop_at_end_of_turn(generation_config, tokenizer) -> None:
    """Make `generate()` stop at the chat template's end of turn as well as at <eos> (edits in place).

    A model trained on chat turns ends its answer with the end-of-turn token; a generation config
    that stops only at <eos> runs past it into a made-up next turn.
    """
    eos = generation_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    ids += [i for i in end_of_turn_ids(tokenizer) if i not in ids]
    if ids:
        generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
