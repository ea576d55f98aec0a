"""`fpo-ds demo`: the whole FPO pipeline on the embedded tiny world, on CPU, in minutes.

world -> SFT (the reference) -> JumpReLU SAE on its residual stream -> offline cache ->
DPO, SimPO, TDPO-2, FPO from the SFT model (same data order per seed, several seeds) ->
eval -> report (markdown table + plots). Training and the cache go through the same
`train` / `build-cache` code as a cluster run (2 ranks, ZeRO-3, CPU), launched with torchrun.
Every stage is skipped when its output is complete, so re-running resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fpo_ds import checkpoint
from fpo_ds.tools import evaluate, report, toy

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
METHODS = ("dpo", "simpo", "tdpo2", "fpo")
SAE_LAYER = 3  # the last of the tiny model's 4 blocks: the paper finds layers near the output best


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _launch(out: Path, name: str, stages: list[dict], nproc: int) -> None:
    from fpo_ds import pipeline

    if not pipeline.launch(stages, out / f"plan-{name}.json", nproc):
        say(f"{name}: complete, skipped")


def _export_final(run_dir: Path, dest: Path) -> Path:
    if not (dest / "config.json").is_file():
        tag = (run_dir / "checkpoints" / "latest").read_text().strip()
        checkpoint.export(run_dir / "checkpoints" / tag, dest)
    return dest


@torch.no_grad()
def _residuals(model_dir: Path, data_path: Path, layer: int, limit: int = 20000) -> torch.Tensor:
    """Block-`layer` outputs on the response tokens of the training pairs (the SAE's training data)."""
    from fpo_ds import data
    from fpo_ds import model as M

    model, tok = evaluate.load_model(model_dir), M.load_tokenizer(str(model_dir))
    pairs, _ = data.build_pairs(data.load_rows(str(data_path), "train"), tok, 64, 32, "drop", str(data_path))
    tap, acts = M.ResidualTap(model, layer), []
    for i in range(0, len(pairs), 32):
        batch = data.collate(pairs[i : i + 32], tok.pad_token_id)
        tap.arm()
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        acts.append(tap.take()[batch.attention_mask.bool()])
    return torch.cat(acts)[:limit]


def train_sae(model_dir: Path, data_path: Path, out: Path, d_sae: int = 256, steps: int = 1500, seed: int = 0) -> Path:
    """A JumpReLU SAE trained with sae-lens's own training SAE and loss, saved with its inference format."""
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata, TrainStepInput

    acts = _residuals(model_dir, data_path, SAE_LAYER)
    torch.manual_seed(seed)
    cfg = JumpReLUTrainingSAEConfig(
        d_in=acts.shape[1],
        d_sae=d_sae,
        l0_coefficient=2.0,
        jumprelu_init_threshold=0.05,
        metadata=SAEMetadata(hook_name=f"blocks.{SAE_LAYER}.hook_resid_post"),
    )
    sae = JumpReLUTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
    for step in range(steps):
        batch = acts[torch.randint(0, len(acts), (512,))]
        res = sae.training_forward_pass(
            TrainStepInput(
                sae_in=batch,
                coefficients={"l0": 2.0},
                dead_neuron_mask=None,
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        opt.zero_grad()
        res.loss.backward()
        opt.step()
    l0 = (res.feature_acts > 0).float().sum(-1).mean().item()
    say(f"SAE: d_sae {d_sae}, mse {res.losses['mse_loss'].item():.3f}, L0 {l0:.1f} (layer {SAE_LAYER})")
    sae.save_inference_model(out)
    return out


def _stage(kind: str, out: Path, overrides: dict) -> dict:
    return {"stage": kind, "recipe": str(RECIPE), "overrides": [f"{k}={v}" for k, v in overrides.items()]}


def method_overrides(out: Path, method: str, seed: int, steps: int) -> dict:
    o = {
        "model.name_or_path": out / "sft",
        "data.path": out / "world/data/train.jsonl",
        "loss.method": method,
        "data.seed": seed,
        "train.max_steps": steps,
        "train.lr": 3e-4,
        "train.warmup_steps": 5,
        "output.dir": out / "runs" / f"{method}-s{seed}",
        "output.save_every": 0,
        "logging.every": 20,
    }
    if method == "fpo":
        o.update({"sae.path": out / "sae", "sae.k": 16, "cache.dir": out / "cache", "loss.alpha": 0.5})
    return o


def run(out: Path, seeds: int, steps: int, nproc: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    world = out / "world"
    if not (world / "model" / "config.json").is_file():
        toy.write_world(world, "gemma2", n_train=4096, n_eval=128)
    say(f"world: {world}")
    sft = {
        "model.name_or_path": world / "model",
        "data.path": world / "data/sft.jsonl",
        "loss.method": "sft",
        "train.max_steps": 800,
        "train.epochs": 4,
        "train.lr": 3e-3,
        "train.warmup_steps": 20,
        "train.global_batch_size": 16,
        "train.micro_batch_size": 8,
        "output.dir": out / "runs/sft",
        "output.save_every": 0,
        "logging.every": 50,
    }
    _launch(out, "sft", [_stage("train", out, sft)], nproc)
    _export_final(out / "runs/sft", out / "sft")
    if not (out / "sae" / "cfg.json").is_file():
        train_sae(out / "sft", world / "data/train.jsonl", out / "sae")
    cache_stage = _stage(
        "build-cache", out, {**method_overrides(out, "fpo", 1, steps), "output.dir": out / "runs/cache"}
    )
    runs = [_stage("train", out, method_overrides(out, m, s, steps)) for s in range(1, seeds + 1) for m in METHODS]
    _launch(out, "methods", [cache_stage, *runs], nproc)
    for s in range(1, seeds + 1):
        res = out / "eval" / f"seed{s}" / "results.json"
        if res.is_file():
            continue
        models = {m: str(_export_final(out / "runs" / f"{m}-s{s}", out / "models" / f"{m}-s{s}")) for m in METHODS}
        say(f"eval seed {s}")
        evaluate.evaluate(
            models,
            str(out / "sft"),
            str(world / "data/eval.jsonl"),
            str(res.parent),
            sae_path=str(out / "sae"),
            judge=toy.judge,
            seed=s,
        )
    path = report.write(out, METHODS, seeds)
    print(path.read_text())
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fpo-ds demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per preference run")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (CPU processes here)")
    args = p.parse_args(argv)
    run(Path(args.out), args.seeds, args.steps, args.nproc)


if __name__ == "__main__":
    main()
