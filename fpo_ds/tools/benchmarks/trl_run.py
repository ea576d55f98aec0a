"""TRL as a second implementation: the same run as an fpo-ds recipe, trained by TRL's own trainers.

    python -m fpo_ds.tools.benchmarks.trl_run SPEC.json                          # one process
    torchrun --nproc_per_node 2 -m fpo_ds.tools.benchmarks.trl_run SPEC.json     # DDP (gloo on CPU)

SPEC.json: {"model": DIR, "rows": [...], "out": DIR, "runs": [{"name", "method", "beta", ...}]}.
`rows` are preference rows (prompt, chosen, rejected strings) in the order they are consumed:
the sampler is sequential, so step s trains on rows [s*B, (s+1)*B) with B the per-step batch over
all ranks. Each run writes OUT/NAME/metrics.jsonl (one record per optimizer step, written as the
step ends, with fpo-ds's metric names) and OUT/NAME/tokens.json (the token ids TRL trained on).
TRL is used as a library (`pip install trl==1.16.0`, in the `dev` extra); nothing of it is copied.

Every setting that changes the math is set explicitly to what fpo-ds computes, see `trl_args`.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

TRL_VERSION = "1.16.0"  # what the settings below were checked against (pyproject's dev extra)
METHODS = ("dpo", "ipo", "simpo")
STEP_KEYS = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def conversation(row: dict) -> dict:
    """A (prompt, chosen, rejected) string row as TRL's conversational format, rendered as fpo-ds renders it.

    fpo-ds turns a string prompt into one user message and a response into one assistant message
    (data.normalise); TRL then applies the same tokenizer's chat template.
    """
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def fpo_ds_order(pairs: list, seed: int, steps: int, micro: int, world: int) -> list[int]:
    """Positions into `pairs` in the order fpo-ds trains on them with global batch = micro x world.

    Step by step, and within a step rank by rank (data.micro_batches, longest first on each rank):
    TRL's sequential sampler hands process r the r-th batch of each step's `world` batches, so fed in
    this order, every process of TRL gets the pairs the same rank of fpo-ds gets.
    """
    from fpo_ds import data

    lengths = [data.padded_length(p) for p in pairs]
    order = []
    for step in range(steps):
        (per_rank,) = data.micro_batches(len(pairs), seed, step, micro * world, micro, world, lengths)
        order += [j for positions in per_rank for j in positions]
    return order


def token_ids(pair) -> dict:
    """A pair's token ids in the shape `trained_tokens` reports them."""
    return {"prompt_ids": pair.prompt_ids, "chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids}


def trl_args(run: dict, out: Path, max_length: int):
    """TRL's config for one run, every setting that changes the math matched to an fpo-ds recipe.

    `run`: method (dpo, ipo, simpo), beta, lr, steps, batch (per process), gamma_beta_ratio
    (simpo), seed. fpo-ds: torch AdamW (eps 1e-8, no weight decay), constant lr after
    `train.warmup_steps: 0`, clipping 1.0 in the DeepSpeed JSON, fp32, mean over pairs.
    """
    common = dict(
        output_dir=str(out),
        per_device_train_batch_size=run["batch"],
        gradient_accumulation_steps=1,
        max_steps=run["steps"],
        learning_rate=run["lr"],
        lr_scheduler_type="constant",  # fpo-ds: warmup_steps 0, schedule constant
        warmup_steps=0,
        max_grad_norm=1.0,  # ds_configs/*.json: gradient_clipping 1.0
        optim="adamw_torch",  # plain torch AdamW, as fpo-ds (the default here would be the fused kernel)
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        bf16=False,  # TRL defaults to bf16; the fpo-ds side runs an fp32 DeepSpeed JSON
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is True; it changes memory and time, not the math
        train_sampling_strategy="sequential",  # rows are given in fpo-ds's order: no reshuffle
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=run.get("seed", 42),
        disable_dropout=True,  # the toy models have no dropout; fpo-ds runs them in train mode as they are
        max_length=max_length,  # above every pair's length: TRL truncates nothing, like fpo-ds here
    )
    if run["method"] == "simpo":
        from trl.experimental.cpo import CPOConfig

        return CPOConfig(
            **common,
            loss_type="simpo",
            cpo_alpha=0.0,  # no NLL term: plain SimPO
            beta=run["beta"],
            # CPO computes -logsigmoid(beta * (mean_w - mean_l - simpo_gamma / beta)): simpo_gamma is the margin
            # itself, which fpo-ds writes as gamma = beta * gamma_beta_ratio.
            simpo_gamma=run["beta"] * run.get("gamma_beta_ratio", 0.5),
            alpha=0.0,  # no AlphaPO reward shaping
            label_smoothing=0.0,
            remove_unused_columns=False,
        )
    from trl import DPOConfig

    return DPOConfig(
        **common,
        loss_type=["sigmoid" if run["method"] == "dpo" else "ipo"],  # TRL's IPO divides log-ratios by |y| too
        beta=run["beta"],
        label_smoothing=0.0,
        precompute_ref_log_probs=False,  # a live reference model, as loss.reference: live
        ld_alpha=None,  # no LD-DPO down-weighting of the longer response's tail
        use_weighting=False,  # no WPO weights
        f_divergence_type="reverse_kl",  # standard DPO
        sync_ref_model=False,  # the reference stays the starting model
        padding_free=False,
        pad_to_multiple_of=None,  # right-padded to the batch's longest sequence, as data.collate
        truncation_mode="keep_start",
    )


def _load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def trainer(run: dict, model_dir: str, rows: list[dict], out: Path, max_length: int, callbacks: list):
    """TRL's trainer for `run`: DPOTrainer (dpo, ipo) or CPOTrainer with loss_type simpo."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list([conversation(r) for r in rows])
    args = trl_args(run, out, max_length)
    if run["method"] == "simpo":
        from trl.experimental.cpo import CPOTrainer

        return CPOTrainer(_load(model_dir), args, train_dataset=data, processing_class=tok, callbacks=callbacks)
    from trl import DPOTrainer

    if run.get("lora"):
        return _peft_dpo(run, model_dir, args, data, tok, callbacks)
    return DPOTrainer(
        _load(model_dir), _load(model_dir), args, train_dataset=data, processing_class=tok, callbacks=callbacks
    )


def _peft_dpo(run: dict, model_dir: str, args, data, tok, callbacks: list):
    """DPO with LoRA as TRL does it: `peft_config` and no ref_model (the reference is the adapters-off model).

    `run["lora"]`: an fpo-ds model.lora block. The adapters TRL creates are then set to the ones
    fpo-ds starts from (fpo_ds.lora.wrap on the same model with the run's seed), so both train the
    same initial adapters.
    """
    from trl import DPOTrainer

    from fpo_ds import config as C
    from fpo_ds import lora

    cfg = C.LoRAConfig(**run["lora"])
    tr = DPOTrainer(
        _load(model_dir),
        None,
        args,
        train_dataset=data,
        processing_class=tok,
        callbacks=callbacks,
        peft_config=lora.peft_config(cfg),
    )
    start = dict(lora.wrap(_load(model_dir), cfg, seed=run.get("seed", 42)).named_parameters())
    mine = {n: p for n, p in tr.model.named_parameters() if p.requires_grad}
    if not mine or not mine.keys() <= start.keys():
        raise ValueError(f"TRL's PEFT model has other adapters than fpo-ds: {sorted(set(mine) - set(start))[:3]}")
    for name, p in mine.items():
        p.data.copy_(start[name].data)
    return tr


def trained_tokens(tr) -> list[dict]:
    """The (prompt, chosen, rejected) token ids of each row as the TRL trainer tokenised them."""
    ds = tr.train_dataset
    if "chosen_ids" in ds.column_names:  # DPOTrainer
        return [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in ds]
    out = []
    for r in ds:  # CPOTrainer: prompt + response sequences, labels -100 on the prompt
        n = len(r["prompt_input_ids"])
        out.append({"prompt_ids": r["prompt_input_ids"], "chosen_ids": r["chosen_input_ids"][n:]})
        out[-1]["rejected_ids"] = r["rejected_input_ids"][n:]
    return out


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _callback(path: Path):
    """A TrainerCallback that appends one record per optimizer step to `path` (rank 0) as the step ends."""
    from transformers import TrainerCallback

    class StepRecords(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or "loss" not in (logs or {}):
                return
            rec = {"step": state.global_step, **{k: logs[k] for k in STEP_KEYS if k in logs}}
            rec.update(step_time_s=self.seconds, peak_mem_mib=peak_rss_mib(), wall_time=time.time())
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    return StepRecords()


def run_one(run: dict, spec: dict) -> None:
    out = Path(spec["out"]) / run["name"]
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if int(os.environ.get("RANK", "0")) == 0:
        metrics.unlink(missing_ok=True)
    tr = trainer(run, spec["model"], spec["rows"], out, spec.get("max_length", 1024), [_callback(metrics)])
    if tr.is_world_process_zero():
        (out / "tokens.json").write_text(json.dumps(trained_tokens(tr)))
    tr.train()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for run in spec["runs"]:
        run_one(run, spec)


if __name__ == "__main__":
    main()
