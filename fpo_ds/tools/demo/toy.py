"""The embedded tiny world: a toy preference task, a locally trained tokenizer, tiny models.

The task: repeat a digit sequence (the judge checks the copy). Nothing here downloads anything.
`write_world` produces a directory that the ordinary recipe machinery loads like any real
model and dataset:

    world/model/   config.json, model.safetensors, tokenizer files (with a chat template)
    world/data/    train.jsonl, eval.jsonl  (prompt, chosen, rejected strings)
                   sft.jsonl  (demonstrations for SFT, `chosen` only, 30% of them wrong)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Where the embedded default's paths come from (said by the errors for a missing model or data path).

# Gemma-style turns: the same template shape as the paper's model family.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SPECIAL = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]


def repeat_pair(rng: random.Random) -> dict:
    """One pair: repeat a digit sequence. Chosen copies it; rejected alters one digit, drops or swaps."""
    digits = [str(rng.randint(0, 9)) for _ in range(4)]
    wrong = list(digits)
    kind = rng.choice(["change", "drop", "swap"])
    i = rng.randrange(len(wrong) - 1)
    if kind == "change":
        wrong[i] = str((int(wrong[i]) + rng.randint(1, 9)) % 10)
    elif kind == "drop":
        del wrong[i]
    else:
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        if wrong == digits:
            wrong[i] = str((int(wrong[i]) + 1) % 10)
    return {"prompt": "Repeat: " + " ".join(digits), "chosen": " ".join(digits), "rejected": " ".join(wrong)}


def judge(prompt: str, response: str) -> bool:
    """True when the response repeats the prompt's digits exactly, in order."""
    want = [t for t in prompt.split(":", 1)[-1].split() if t.isdigit()]
    return response.split() == want


def toy_pairs(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """N pairs whose prompts are not in `exclude` (held-out sets never share a prompt with training)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        pair = repeat_pair(rng)
        if pair["prompt"] not in exclude:
            out.append(pair)
    return out


def build_tokenizer(texts: list[str], vocab_size: int = 384):
    """Byte-level BPE trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, tokenizer=None, hidden: int = 64, layers: int = 4):
    """A few-layer model of the given family (one per model.SOFTCAP_ATTR type), small enough for CPU tests."""
    from transformers import Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=256,
    )
    if tokenizer is not None:
        common.update(
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    if arch == "gemma2":
        return Gemma2Config(**common, sliding_window=128, query_pre_attn_scalar=hidden // 4)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "gemma":  # tied embeddings, no softcap
        return GemmaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny arch {arch!r}: use gemma2, gemma, llama, mistral or qwen2")


def write_world(
    out: str | Path,
    arch: str = "gemma2",
    n_train: int = 512,
    n_eval: int = 64,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 4,
) -> Path:
    """Write tokenizer + random-init tiny model + toy data under `out`; returns `out`.

    Runs in one process without DeepSpeed: random init happens here, so training always
    loads weights from disk (transformers' init under ZeRO-3 partitioning is never needed).
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    train = toy_pairs(n_train, seed)
    evals = toy_pairs(n_eval, seed + 1, exclude={p["prompt"] for p in train})
    texts = [p[k] for p in train for k in ("prompt", "chosen", "rejected")] + ["user", "model"]
    tok = build_tokenizer(texts)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), tok, hidden, layers))
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    # The SFT demonstrator is imperfect: 30% of its demonstrations are the corrupted answer, so
    # the SFT model (the reference) copies imperfectly and preference training has work to do.
    rng = random.Random(seed + 2)
    sft = [dict(p, chosen=p["rejected"], rejected=p["chosen"]) if rng.random() < 0.3 else p for p in train]
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", evals), ("sft", sft)):
        with open(out / "data" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return out


def random_sae(arch: str, d_in: int, d_sae: int, layer: int, seed: int = 0, **extra):
    """A random sae-lens SAE of the given architecture reading blocks.{layer}.hook_resid_post."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    classes = {
        "standard": (StandardSAE, StandardSAEConfig),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
        "topk": (TopKSAE, TopKSAEConfig),
    }
    cls, cfg_cls = classes[arch]
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post"), **extra)
    sae = cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.2)
    return sae
