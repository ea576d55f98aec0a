"""Single-process checks of the SAE encoder (the 2-rank comparison lives in test_train_mp)."""

import pytest
import torch

from fpo_ds import losses, toy
from fpo_ds.sae import ShardedEncoder


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_chunked_checkpointed_encode_matches_sae_lens(monkeypatch, arch):
    monkeypatch.setattr(ShardedEncoder, "CHUNK_TOKENS", 3)  # many chunks, one ragged
    sae = toy.random_sae(arch, 8, 20, 0, seed=4, **({"k": 5} if arch == "topk" else {}))
    enc = ShardedEncoder(sae, 0, 1)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 6, 8, generator=g, requires_grad=True)
    mask = torch.rand(3, 6, generator=g) > 0.3
    w = torch.randn(3, 20, generator=g)
    (enc.pooled(h, mask) * w).sum().backward()
    h2 = h.detach().clone().requires_grad_(True)
    want = losses.masked_mean(sae.encode(h2), mask)
    (want * w).sum().backward()
    assert torch.allclose(enc.pooled(h.detach(), mask), want, atol=1e-6) and want.abs().sum() > 0
    assert torch.allclose(h.grad, h2.grad, atol=1e-6)
    assert enc.resident_bytes() < sum(p.numel() * p.element_size() for p in sae.parameters())
