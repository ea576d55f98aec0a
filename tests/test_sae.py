"""Single-process checks of the SAE encoder (the 2-rank comparison lives in test_train_mp)."""

import pytest
import torch

from fpo_ds import dist, losses
from fpo_ds.encoder import ShardedEncoder, comm_bytes_per_call, pack_bits, unpack_bits
from fpo_ds.tools.demo import toy

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
    enc = ShardedEncoder(sae, dist.Group((0,), 0, None))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 6, 8, generator=g, requires_grad=True)
    mask = torch.rand(3, 6, generator=g) > 0.3
    w = torch.randn(3, 20, generator=g)
    (enc.pooled(h, mask).features * w).sum().backward()
    h2 = h.detach().clone().requires_grad_(True)
    want = losses.masked_mean(sae.encode(h2), mask)
    (want * w).sum().backward()
    assert torch.allclose(enc.pooled(h.detach(), mask).features, want, atol=1e-6) and want.abs().sum() > 0
    assert torch.allclose(h.grad, h2.grad, atol=1e-6)
    assert enc.resident_bytes() < sum(p.numel() * p.element_size() for p in sae.parameters())


@pytest.mark.parametrize("width", [1, 7, 8, 20, 33])
def test_fired_bits_round_trip(width):
    mask = torch.rand(11, width, generator=torch.Generator().manual_seed(width)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (11, -(-width // 8))
    assert torch.equal(unpack_bits(packed, width), mask)


def test_comm_bytes_formula_by_hand():
    # G=4, 100 tokens of d_in 8 (+1 row-id column) in bf16 from 3 peers, and 3 peers' slices of
    # 4 rows x 5 features in fp32: 3*100*9*2 + 3*4*5*4 = 5400 + 240
    assert comm_bytes_per_call(4, 100, 8, 4, 5, 2, 4) == 5640
    # TopK adds every gathered token's (G*n_max) local top-k values from 3 peers: 3*400*2*4 = 9600
    assert comm_bytes_per_call(4, 100, 8, 4, 5, 2, 4, topk=2) == 5640 + 9600
    assert comm_bytes_per_call(1, 100, 8, 4, 20, 2, 4, topk=2) == 0  # replicated: no traffic


def test_shard_group_sizes_and_refusals():
    assert dist.group_size("node", 16, 8) == 8 and dist.group_size("world", 16, 8) == 16
    assert dist.group_size("none", 16, 8) == 1 and dist.group_size(4, 16, 8) == 4
    with pytest.raises(ValueError, match=r"shard_group: 3 gives groups of 3 ranks.*world of 16.*\[1, 2, 4, 8, 16\]"):
        dist.group_size(3, 16, 8)
    with pytest.raises(ValueError, match="sae.shard_group: 'node' gives groups of 3"):
        dist.group_size("node", 16, 3)  # 16 ranks cannot be nodes of 3


@pytest.mark.parametrize("variant", ["jumprelu", "topk-decnorm"])
def test_every_encoder_tensor_sits_on_the_given_device(variant):
    """A CUDA encoder must not keep one tensor (TopK's decoder norms) on the CPU: checked on the meta device."""
    arch, extra = VARIANTS[variant]
    sae = toy.random_sae(arch, 8, 20, 0, seed=4, **extra)
    enc = ShardedEncoder(sae, dist.Group((0,), 0, None), device="meta")
    held = {name: t for name, t in vars(enc).items() if isinstance(t, torch.Tensor)}
    assert held.keys() == enc.tensors().keys()  # tensors() (and resident_bytes) sees every one
    assert ("dec_norm" if arch == "topk" else "threshold") in held
    assert {name: t.device.type for name, t in held.items()} == dict.fromkeys(held, "meta")
