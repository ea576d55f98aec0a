"""Paths only a GPU reaches: the sharded encoder, the chunked LM head, generate and the collectives on CUDA.

Marked `gpu` and skipped without CUDA. `bash bench/gpu_check.sh` runs them on a GPU; its
`--dry-run` runs the same checks on the CPU (FPO_DS_GPU_TESTS_ON=cpu, gloo instead of NCCL),
so the checks themselves are known to work before a GPU is lent.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fpo_ds import data, dist, losses
from fpo_ds import model as M
from fpo_ds.encoder import ShardedEncoder
from fpo_ds.tools.demo import toy

pytestmark = pytest.mark.gpu

# Every architecture the sharded encoder supports, TopK with decoder-norm rescaling included.
VARIANTS = {
    "standard": ("standard", {}),
    "jumprelu": ("jumprelu", {}),
    "topk": ("topk", {"k": 16}),
    "topk-decnorm": ("topk", {"k": 16, "rescale_acts_by_decoder_norm": True}),
    "layernorm": ("jumprelu", {"normalize_activations": "layer_norm"}),
}
VOCAB = 256_000  # Gemma-2's vocabulary


@pytest.fixture(scope="module")
def device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("FPO_DS_GPU_TESTS_ON") == "cpu":  # bench/gpu_check.sh --dry-run
        return "cpu"
    pytest.skip("needs CUDA; bash bench/gpu_check.sh runs these on a GPU")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sharded_encoder_equals_sae_lens_encode_on_the_device(device, monkeypatch, variant):
    """The production path (a CPU-loaded SAE, sliced onto the device) against sae-lens's own encode there."""
    import copy

    monkeypatch.setattr(ShardedEncoder, "CHUNK_TOKENS", 64)  # several chunks, one ragged
    arch, extra = VARIANTS[variant]
    sae = toy.random_sae(arch, 64, 512, 0, seed=4, **extra)  # on the CPU, as sae.load_sae leaves it
    enc = ShardedEncoder(sae, dist.Group((0,), 0, None), device)
    tensors = {k: v for k, v in vars(enc).items() if isinstance(v, torch.Tensor)}
    assert {k: v.device.type for k, v in tensors.items()} == {k: torch.device(device).type for k in tensors}
    ref = copy.deepcopy(sae).to(device)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 50, 64, generator=g).to(device).requires_grad_(True)
    mask = (torch.rand(4, 50, generator=g) > 0.3).to(device)
    w = torch.randn(4, 512, generator=g).to(device)
    got = enc.pooled(h, mask).features
    (got * w).sum().backward()
    h2 = h.detach().clone().requires_grad_(True)
    want = losses.masked_mean(ref.encode(h2), mask)
    (want * w).sum().backward()
    assert got.device.type == torch.device(device).type and want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-5)


def _vocab_model(tmp_path: Path, device: str, dtype: torch.dtype):
    """A 2-block Gemma-2 at the full 256k vocabulary (16M embedding parameters) and a batch of toy pairs."""
    from transformers import AutoModelForCausalLM

    from fpo_ds import data

    texts = [p[k] for p in toy.toy_pairs(64, 0) for k in ("prompt", "chosen", "rejected")] + ["user", "model"]
    tok = toy.build_tokenizer(texts)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(toy.tiny_config("gemma2", VOCAB, tok, 64, 2))
    with torch.no_grad():  # logits of std ~4 (not ~0.1): a wrong target or position is off by whole nats
        lm.model.embed_tokens.weight.normal_(0.0, 0.5)
    lm.to(device, dtype)
    rows = toy.toy_pairs(4, 1)
    pairs, _ = data.build_pairs(rows, tok, 48, 24, "drop", "test")
    return lm, M.to_device(data.collate(pairs, tok.pad_token_id), device)


def _full_logits_logps(lm, batch) -> torch.Tensor:
    """The oracle: the Hugging Face forward's (B, T, V) logits, log-softmax in fp32, summed per sequence."""
    logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    labels = batch.labels[:, 1:]
    mask = labels != data.IGNORE_INDEX
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (lp * mask).sum(-1)


# dtype of the weights, autocast dtype (None: none), absolute tolerance on per-sequence sums of
# log-probs (about -130 each, ~10 response tokens), tolerance on gradients relative to their largest
# entry. A wrong target or position moves a sum by ~20 nats; bf16 rounds logits of ~4 to ~0.03.
PRECISIONS = {
    "fp32": (torch.float32, None, 2e-3, 1e-3),
    "bf16": (torch.bfloat16, None, 0.5, 5e-2),  # both paths round the same logits to bf16 before the upcast
    "bf16-autocast": (torch.float32, torch.bfloat16, 0.5, 5e-2),
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_chunked_response_logps_equal_full_logits_at_256k_vocab(device, tmp_path, monkeypatch, precision):
    dtype, autocast, tol, grad_tol = PRECISIONS[precision]
    monkeypatch.setattr(losses, "LOGIT_CHUNK", 16)  # several chunks per batch
    lm, batch = _vocab_model(tmp_path, device, dtype)
    with torch.autocast(torch.device(device).type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        got = M.sequence_logps(lm, batch).sum_logps
        want = _full_logits_logps(lm, batch)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=0, atol=tol)
    # The gradient through the chunked head (its own backward) against autograd through the full logits.
    with torch.autocast(torch.device(device).type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        lm.zero_grad(set_to_none=True)
        M.sequence_logps(lm, batch).sum_logps.sum().backward()
        mine = {n: p.grad.float().clone() for n, p in lm.named_parameters() if p.grad is not None}
        lm.zero_grad(set_to_none=True)
        _full_logits_logps(lm, batch).sum().backward()
    theirs = {n: p.grad.float() for n, p in lm.named_parameters() if p.grad is not None}
    assert mine.keys() == theirs.keys() and "model.embed_tokens.weight" in mine
    for name, grad in theirs.items():
        scale = grad.abs().max().item() or 1.0
        torch.testing.assert_close(mine[name], grad, rtol=0, atol=grad_tol * scale, msg=lambda m, n=name: f"{n}: {m}")


def test_generate_on_the_device_gives_the_cpu_greedy_text(device, tmp_path):
    from fpo_ds import generate as G

    world = toy.write_world(tmp_path / "w", "gemma2", n_train=32, n_eval=4)
    convs = [[{"role": "user", "content": p["prompt"]}] for p in toy.toy_pairs(6, 5)]
    s = G.Settings(max_new_tokens=12, dtype="float32", batch_size=4)
    cpu, _ = G.hf_backend(str(world / "model"), s, "cpu", 0)
    dev, info = G.hf_backend(str(world / "model"), s, device, 0)
    want = cpu(convs)
    assert dev(convs) == want and any(n > 0 for _, n, _ in want)
    # The GPU default (dtype auto = bf16 on CUDA) runs through and answers every prompt.
    auto, info = G.hf_backend(str(world / "model"), G.Settings(max_new_tokens=12, batch_size=4), device, 0)
    assert info["dtype"] == ("bfloat16" if device == "cuda" else "float32")
    assert len(auto(convs)) == len(convs)


def test_process_group_runs_the_encoder_collectives(device, tmp_path):
    """One rank on NCCL (gloo in the CPU dry run): the encoder's gather, all-to-all and max all-reduce."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cuda" if device == "cuda" else "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    driver = Path(__file__).with_name("gpu_collectives_driver.py")
    proc = subprocess.run(
        [sys.executable, str(driver), str(tmp_path / "out.json")], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["backend"] == ("nccl" if device == "cuda" else "gloo")
    assert out["device"].startswith(device)
    assert out["checks"] == {
        "gather": True,
        "gather_grad": True,
        "exchange": True,
        "exchange_grad": True,
        "topk_gather": True,
        "n_max": True,
        "any_rank": True,
    }
