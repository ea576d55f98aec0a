"""`fpo-ds eval`: compare trained models against their reference, single process, batched.

On held-out pairs: preference accuracy (chosen beats rejected by mean token log-likelihood,
the paper's measure), DPO-style reward margins, and feature drift (MSE of response-pooled SAE
features to the reference's). On held-out prompts: sampled generations (written in the
instruction/output/generator format AlpacaEval and Arena-Hard read), the mean sequence
KL(policy || reference) and per-token entropy along them, and, when a judge is given, the
judge's score per prompt, from which win rates are computed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from fpo_ds import config as C
from fpo_ds import data, dist, losses, metrics
from fpo_ds import model as M


def load_model(path: str | Path):
    """A model directory, or a LoRA adapter directory (merged into the base its config names)."""
    from fpo_ds import lora

    return lora.load_causal_lm(path, torch.float32).eval()


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def pair_stats(model, pairs: list[data.Pair], pad_id: int, sae=None, layer: int | None = None, bs: int = 16) -> dict:
    """Per-pair summed/mean log-probs of chosen and rejected; pooled SAE features if an SAE is given."""
    tap = M.ResidualTap(model, layer) if sae is not None else None
    out = {"sum_c": [], "sum_r": [], "mean_c": [], "mean_r": [], "feat_c": [], "feat_r": []}
    for chunk in _batches(pairs, bs):
        batch = data.collate(chunk, pad_id)
        if tap:
            tap.arm()
        seq = M.sequence_logps(model, batch)
        b = len(chunk)
        mean = seq.sum_logps / seq.n_tokens
        out["sum_c"].append(seq.sum_logps[:b])
        out["sum_r"].append(seq.sum_logps[b:])
        out["mean_c"].append(mean[:b])
        out["mean_r"].append(mean[b:])
        if tap:
            feats = losses.masked_mean(sae.encode(tap.take()), batch.labels != data.IGNORE_INDEX)
            out["feat_c"].append(feats[:b])
            out["feat_r"].append(feats[b:])
    if tap:
        tap.remove()
    return {k: torch.cat(v) for k, v in out.items() if v}


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, bs: int = 32, temperature: float = 1.0
) -> list[list[int]]:
    """Continuations (sampled; greedy at temperature 0), batched and left-padded; ids up to the end of turn."""
    tokenizer.padding_side = "left"
    stop = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")} if t is not None]
    stop = [t for t in stop if t != tokenizer.unk_token_id]
    outs = []
    torch.manual_seed(seed)
    for chunk in _batches(prompts, bs):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in chunk
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = {"do_sample": False}
        if temperature:
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        gen = model.generate(
            **enc, **sampling, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id
        )
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            outs.append(row[:cut])
    return outs


@torch.no_grad()
def kl_and_entropy(model, ref, tokenizer, prompts: list[str], gens: list[list[int]]) -> tuple[float, float]:
    """Mean over prompts of sum_t KL(pi || ref) on the generated tokens; mean per-token entropy of pi."""
    kls, ents, n_tok = [], 0.0, 0
    for p, g in zip(prompts, gens):
        if not g:
            continue
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids + g])
        lp = torch.log_softmax(model(input_ids=x).logits[0, len(ids) - 1 : -1].float(), -1)
        lq = torch.log_softmax(ref(input_ids=x).logits[0, len(ids) - 1 : -1].float(), -1)
        kls.append((lp.exp() * (lp - lq)).sum().item())
        ents += -(lp.exp() * lp).sum().item()
        n_tok += len(g)
    return sum(kls) / max(len(kls), 1), ents / max(n_tok, 1)


def compare_models(
    models: dict[str, str],
    reference: str,
    eval_path: str,
    out_dir: str,
    beta: float = 0.1,
    sae_path: str | None = None,
    judge: Callable[[str, str], bool] | None = None,
    max_new_tokens: int = 24,
    seed: int = 0,
    max_pairs: int | None = None,
) -> dict:
    """Evaluate each model against `reference`; writes results.json and generations/*.json under out_dir."""
    out = Path(out_dir)
    (out / "generations").mkdir(parents=True, exist_ok=True)
    tok = M.load_tokenizer(reference)
    data_cfg = C.DataConfig(path=eval_path, max_length=1024, max_prompt_length=512, max_samples=max_pairs)
    rows = data.select_rows(data_cfg)
    pairs, _ = data.load_pairs(data_cfg, tok)  # tokenized once, like training's data
    prompts = [r["prompt"] for r in rows]
    sae = layer = None
    if sae_path:
        from fpo_ds.sae import hook_layer, load_sae

        sae = load_sae(sae_path)
        layer = hook_layer(sae)
    ref = load_model(reference)
    ref_stats = pair_stats(ref, pairs, tok.pad_token_id, sae, layer)
    results, todo = {}, {"reference": reference, **models}
    progress = metrics.Progress("eval", len(todo), "models", every_s=0)
    for i, (name, path) in enumerate(todo.items()):
        dist.log(f"eval: model {i + 1}/{len(todo)} {name} ({path}): {len(pairs)} pairs, {len(prompts)} generations")
        pol = ref if name == "reference" else load_model(path)
        st = ref_stats if name == "reference" else pair_stats(pol, pairs, tok.pad_token_id, sae, layer)
        margins = beta * ((st["sum_c"] - ref_stats["sum_c"]) - (st["sum_r"] - ref_stats["sum_r"]))
        correct = (st["mean_c"] > st["mean_r"]).float()
        # Per-pair and per-prompt values are kept so that differences can be bootstrapped over pairs.
        r = {"preference_accuracy": correct.mean().item(), "pref_correct": correct.tolist()}
        r["reward_margin"] = margins.mean().item()
        if sae is not None:
            drift = torch.stack([st["feat_c"] - ref_stats["feat_c"], st["feat_r"] - ref_stats["feat_r"]], 1)
            r["feature_mse"] = drift.pow(2).mean().item()  # (pairs, 2, d_sae): chosen and rejected
            r["feature_mse_pairs"] = drift.pow(2).mean((1, 2)).tolist()
        gens = generate(pol, tok, prompts, max_new_tokens, seed)
        texts = [tok.decode(g, skip_special_tokens=True).strip() for g in gens]
        r["seq_kl"], r["entropy"] = kl_and_entropy(pol, ref, tok, prompts, gens)
        if judge is not None:
            r["scores"] = [float(judge(p, t)) for p, t in zip(prompts, texts)]
            r["judge_accuracy"] = sum(r["scores"]) / len(r["scores"])
        records = [{"instruction": p, "output": t, "generator": name} for p, t in zip(prompts, texts)]
        (out / "generations" / f"{name}.json").write_text(json.dumps(records, indent=1))
        results[name] = r
        progress.update(i + 1, f"({name}: preference accuracy {r['preference_accuracy']:.3f})")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def win_rate(a: list[float], b: list[float]) -> float:
    """Head-to-head: share of prompts where a's score beats b's, ties counted half."""
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    return wins / max(len(a), 1)
