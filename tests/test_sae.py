"""Single-process checks of the SAE encoder (the 2-rank comparison lives in test_train_mp)."""

import pytest
import torch

from fpo_ds import losses
from fpo_ds.sae import ShardedEncoder, pack_bits, unpack_bits
from fpo_ds.tools import toy

VARIANTS = {
    "standard": ("standard", {}),
    "jumprelu": ("jumprelu", {}),
    "topk": ("topk", {"k": 5}),
    "topk-decnorm": ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    "layernorm": ("jumprelu", {"normalize_activations": "layer_norm"}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_encode_matches_sae_lens_forward_and_gradient(monkeypatch, variant):
    monkeypatch.setattr(ShardedEncoder, "CHUNK_TOKENS", 3)  # many chunks, one ragged
    arch, extra = VARIANTS[variant]
    sae = toy.random_sae(arch, 8, 20, 0, seed=4, **extra)
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


@pytest.mark.parametrize("width", [1, 7, 8, 20, 33])
def test_fired_bits_round_trip(width):
    mask = torch.rand(11, width, generator=torch.Generator().manual_seed(width)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (11, -(-width // 8))
    assert torch.equal(unpack_bits(packed, width), mask)
