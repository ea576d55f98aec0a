"""`fpo-ds demo`: the whole FPO pipeline on the embedded tiny world, on CPU, in minutes.

Per seed: world (data, tokenizer, random init) -> SFT (the reference) -> JumpReLU SAE on its
residual stream -> offline cache -> DPO, SimPO, TDPO-2, FPO from that SFT model (one data order
per seed) -> eval; then the report (tables, paired bootstrap CIs, plots) over the seeds.
Training and the cache go through the same `train` / `build-cache` code as a cluster run
(2 ranks, ZeRO-3, CPU), launched with torchrun.
Every stage is skipped when its output is complete, so re-running resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from fpo_ds import checkpoint
from fpo_ds import config as C
from fpo_ds.tools.demo import evaluate, report, toy

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "tiny.yaml"
METHODS = ("dpo", "simpo", "tdpo2", "fpo")
SAE_LAYER = 3  # the last of the tiny model's 4 blocks: the paper finds layers near the output best
PREF_PAIRS = 1024  # of the world's 4096: a run sees 60 steps x 8 = 480 pairs, and the cache covers only these
WORLD_SEED_STRIDE = 10  # world s draws from seeds 10s, 10s+1, 10s+2 (train, eval, SFT noise): no two worlds share one
# Same kernels on every x86 CPU with AVX2, for this process and the ranks it launches (they inherit
# os.environ). Left alone, ATen picks its AVX-512 or AVX2 kernels by CPU (softmax, norms and
# reductions then sum in another order), MKL picks its GEMM code path by CPU and vendor, and the
# thread count splits reductions: any of these changes the last bits, and the runs amplify them.
# oneDNN (where torch's bf16 matmuls go: AMX on CPUs that have it) runs no primitive in the demo
# (fp32 throughout; ONEDNN_VERBOSE=1 over a one-seed demo printed none), so its ISA changes no bit
# today; it is capped at AVX2 all the same, so that a bf16 path added later is not AMX on one CPU.
NUMERICS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "1",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def pin_numerics() -> str:
    """Put NUMERICS into os.environ before any kernel runs; says what took effect."""
    os.environ.update(NUMERICS)
    got = torch.backends.cpu.get_cpu_capability()  # fixed at the first kernel call, AVX2 if the env was in time
    note = "" if got == "AVX2" else f" (ATen runs {got} kernels here: the numbers will not match other machines)"
    return ", ".join(f"{k}={v}" for k, v in NUMERICS.items()) + note


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
    tap, acts, n = M.ResidualTap(model, layer), [], 0
    for i in range(0, len(pairs), 32):
        if n >= limit:  # the first `limit` rows are all the SAE sees: skip the forward passes past them
            break
        batch = data.collate(pairs[i : i + 32], tok.pad_token_id)
        tap.arm()
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        acts.append(tap.take()[batch.attention_mask.bool()])
        n += len(acts[-1])
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


def _stage(kind: str, overrides: dict) -> dict:
    return {"stage": kind, "recipe": str(RECIPE), "overrides": [f"{k}={v}" for k, v in overrides.items()]}


def seed_dir(out: Path, seed: int) -> Path:
    """Everything seed `seed` builds before preference training: world/, sft/ (the reference), sae/, cache/."""
    return out / f"seed{seed}"


def sft_overrides(out: Path, seed: int, steps: int) -> dict:
    return {
        "model.name_or_path": seed_dir(out, seed) / "world/model",
        "data.path": seed_dir(out, seed) / "world/data/sft.jsonl",
        "data.seed": seed,
        "loss.method": "sft",
        "train.seed": seed,
        "train.max_steps": steps,
        "train.epochs": 4,
        # With 20 warm-up steps, 2 of 4 seeds sat at the unigram loss (~1.6) for all 300 steps; at lr 1e-3
        # all learnt, but DPO and SimPO then turned those softer references into byte garbage.
        "train.lr": 3e-3,
        "train.warmup_steps": 100,
        "train.global_batch_size": 16,
        "train.micro_batch_size": 8,
        "output.dir": out / "runs" / f"sft-s{seed}",
        "output.save_every": 0,
        "logging.every": 50,
    }


def method_overrides(out: Path, method: str, seed: int, steps: int) -> dict:
    d = seed_dir(out, seed)
    o = {
        "model.name_or_path": d / "sft",
        "data.path": d / "world/data/train.jsonl",
        "data.max_samples": PREF_PAIRS,
        "loss.method": method,
        "data.seed": seed,
        "train.seed": seed,
        "train.max_steps": steps,
        "train.lr": 3e-4,
        "train.warmup_steps": 5,
        "output.dir": out / "runs" / f"{method}-s{seed}",
        "output.save_every": 0,
        "logging.every": 20,
    }
    if C.LossConfig(method=method).needs_features:  # the SAE, and the cache that holds the reference's features
        o.update({"sae.path": d / "sae", "sae.k": 16, "cache.dir": d / "cache", "loss.alpha": 0.5})
    return o


def _check_layout(out: Path, settings: dict) -> None:
    """Refuse to resume in a directory made with other settings (its stages would be skipped as complete)."""
    marker = out / "demo.json"
    if marker.is_file():
        made = json.loads(marker.read_text())
        if made != settings:
            raise SystemExit(f"{out} holds a demo made with {made}, not {settings}: remove it or pick another --out")
    elif (out / "world").exists() or (out / "runs").exists():
        raise SystemExit(
            f"{out} holds a demo made by an older version (one shared world): remove it or pick another --out"
        )
    else:
        marker.write_text(json.dumps(settings))


def _prepare(out: Path, seeds: range, sft_steps: int, n_eval: int, nproc: int) -> None:
    """Per seed: world (data, tokenizer, random init), SFT -> the reference, SAE on the reference."""
    for s in seeds:
        world = seed_dir(out, s) / "world"
        if not (world / "model" / "config.json").is_file():
            toy.write_world(world, "gemma2", n_train=4096, n_eval=n_eval, seed=WORLD_SEED_STRIDE * s)
    _launch(out, "sft", [_stage("train", sft_overrides(out, s, sft_steps)) for s in seeds], nproc)
    for s in seeds:
        d = seed_dir(out, s)
        _warn_if_sft_failed(out / "runs" / f"sft-s{s}" / "metrics.jsonl", s)
        _export_final(out / "runs" / f"sft-s{s}", d / "sft")
        if not (d / "sae" / "cfg.json").is_file():
            train_sae(d / "sft", d / "world/data/train.jsonl", d / "sae", seed=s)


def _warn_if_sft_failed(metrics_path: Path, seed: int, plateau: float = 1.2) -> None:
    """An SFT run that ends near the unigram loss (~1.6 nats) has not learnt to copy: its seed is not comparable."""
    last = json.loads(metrics_path.read_text().splitlines()[-1])
    if last["loss"] > plateau:
        say(f"WARNING: seed {seed}'s SFT ended at loss {last['loss']:.2f} (> {plateau}): it did not learn to copy")


def _evaluate(out: Path, seed: int) -> None:
    res = out / "eval" / f"seed{seed}" / "results.json"
    if res.is_file():
        return
    d = seed_dir(out, seed)
    models = {m: str(_export_final(out / "runs" / f"{m}-s{seed}", out / "models" / f"{m}-s{seed}")) for m in METHODS}
    say(f"eval seed {seed}")
    evaluate.compare_models(
        models,
        str(d / "sft"),
        str(d / "world/data/eval.jsonl"),
        str(res.parent),
        sae_path=str(d / "sae"),
        judge=toy.judge,
        seed=seed,
    )


def run(out: Path, seeds: int, steps: int, nproc: int, sft_steps: int = 400, n_eval: int = 256) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    _check_layout(out, {"layout": 2, "steps": steps, "sft_steps": sft_steps, "n_eval": n_eval})
    numerics = pin_numerics()
    say(f"numerics: {numerics}")
    t0, every = time.perf_counter(), range(1, seeds + 1)
    _prepare(out, every, sft_steps, n_eval, nproc)
    say(f"worlds, SFT references and SAEs for {seeds} seeds: {time.perf_counter() - t0:.0f} s")
    stages = []
    for s in every:
        cache = {**method_overrides(out, "fpo", s, steps), "output.dir": out / "runs" / f"cache-s{s}"}
        stages += [
            _stage("build-cache", cache),
            *(_stage("train", method_overrides(out, m, s, steps)) for m in METHODS),
        ]
    _launch(out, "methods", stages, nproc)
    say(f"caches and {len(METHODS)} methods x {seeds} seeds trained: {time.perf_counter() - t0:.0f} s")
    for s in every:
        _evaluate(out, s)
    path = report.write(out, METHODS, seeds, numerics)
    say(f"done in {time.perf_counter() - t0:.0f} s")
    print(path.read_text())
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fpo-ds demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seeds", type=int, default=4, help="independent pipelines: world, SFT, SAE, data order")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per preference run")
    p.add_argument("--sft-steps", type=int, default=400, help="optimizer steps of each seed's SFT run")
    p.add_argument("--n-eval", type=int, default=256, help="held-out pairs (and prompts) per seed")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (CPU processes here)")
    args = p.parse_args(argv)
    run(Path(args.out), args.seeds, args.steps, args.nproc, args.sft_steps, args.n_eval)


if __name__ == "__main__":
    main()
