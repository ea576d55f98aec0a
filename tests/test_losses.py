"""Losses against independent, hand-written formulas on random float64 tensors."""

import math

import pytest
import torch

from fpo_ds import losses as L

torch.manual_seed(0)
B = 6
LN2 = math.log(2.0)


def _sig_loss(u):
    return [math.log(1.0 + math.exp(-x)) for x in u]


def _rand(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad)


def _head_case(n=9, d=4, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    return h, w, torch.randint(0, v, (n,), generator=g)


@pytest.mark.parametrize("softcap", [None, 0.8])
def test_head_outputs_logps_by_hand(softcap):
    h, w, y = _head_case()
    got = L.head_outputs(h, w, y, softcap, chunk=4)[0]  # chunks of 4, 4 and 1
    for i in range(h.shape[0]):
        z = [sum(a * b for a, b in zip(h[i].tolist(), w[j].tolist())) for j in range(w.shape[0])]
        z = [softcap * math.tanh(x / softcap) for x in z] if softcap else z
        want = z[y[i]] - math.log(sum(math.exp(x) for x in z))
        assert got[i].item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("softcap", [None, 0.8])
def test_head_outputs_kl_by_hand_and_zero_at_equality(softcap):
    h, w, y = _head_case()
    hr, wr, _ = _head_case(seed=1)
    entered = []
    _, kl, _ = L.head_outputs(h, w, y, softcap, (hr, wr), lambda: _Entered(entered), chunk=4)
    assert entered == [1]  # the reference weight is gathered once for the whole forward, not per chunk
    cap = (lambda z: softcap * torch.tanh(z / softcap)) if softcap else (lambda z: z)
    for i in range(h.shape[0]):
        p = torch.softmax(cap(wr @ hr[i]), -1).tolist()
        q = torch.softmax(cap(w @ h[i]), -1).tolist()
        assert kl[i].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), abs=1e-12)
    _, same, _ = L.head_outputs(h, w, y, softcap, (h, w))
    assert torch.allclose(same, torch.zeros_like(same), atol=1e-12)


class _Entered:
    def __init__(self, log):
        self.log = log

    def __enter__(self):
        self.log.append(1)

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("softcap", [None, 0.8])
def test_head_outputs_gradients_by_finite_differences(softcap):
    """Backward recomputes each chunk's logits: d_hidden and d_weight against torch's numerical gradient."""
    h, w, y = _head_case(n=5, d=3, v=6)
    hr, wr, _ = _head_case(n=5, d=3, v=6, seed=1)
    torch.autograd.gradcheck(lambda a, b: L.head_outputs(a, b, y, softcap, chunk=2)[0], (h, w))

    def both(a, b):
        logps, kl, _ = L.head_outputs(a, b, y, softcap, (hr.detach(), wr.detach()), chunk=2)
        return logps * 0.3 + kl  # both outputs' gradients flow back through one chunk loop

    torch.autograd.gradcheck(both, (h, w))
    entered = []
    logps, kl, _ = L.head_outputs(h, w, y, softcap, (hr, wr), lambda: _Entered(entered), chunk=2)
    (logps.sum() + kl.sum()).backward()
    assert entered == [1, 1]  # once in forward, once in backward
    assert hr.grad is None and wr.grad is None  # the reference gets no gradient


def test_dpo_formula_and_ln2_at_reference():
    sc, sr, rc, rr = (_rand(B) for _ in range(4))
    out = L.dpo(sc, sr, rc, rr, 0.1)
    u = [0.1 * ((a - b) - (c - d)) for a, b, c, d in zip(sc.tolist(), rc.tolist(), sr.tolist(), rr.tolist())]
    assert out.losses.tolist() == pytest.approx(_sig_loss(u), abs=1e-12)
    assert (out.chosen_rewards - out.rejected_rewards).tolist() == pytest.approx(u, abs=1e-12)
    same = L.dpo(sc, sr, sc, sr, 0.1).losses
    assert same.tolist() == pytest.approx([LN2] * B, abs=1e-12)


def test_ipo_formula_and_value_at_reference():
    sc, sr, rc, rr = (_rand(B) for _ in range(4))
    nc, nr = torch.randint(1, 9, (B,)).double(), torch.randint(1, 9, (B,)).double()
    beta = 0.2
    out = L.ipo(sc, sr, rc, rr, nc, nr, beta)
    for i in range(B):
        h = (sc[i] - rc[i]) / nc[i] - (sr[i] - rr[i]) / nr[i]
        assert out.losses[i].item() == pytest.approx((h.item() - 1 / (2 * beta)) ** 2, abs=1e-12)
    same = L.ipo(sc, sr, sc, sr, nc, nr, beta).losses
    assert same.tolist() == pytest.approx([(1 / (2 * beta)) ** 2] * B, abs=1e-12)


def test_simpo_formula():
    mc, mr = _rand(B), _rand(B)
    out = L.simpo(mc, mr, 2.0, 0.5)
    u = [2.0 * (a - b) - 1.0 for a, b in zip(mc.tolist(), mr.tolist())]
    assert out.losses.tolist() == pytest.approx(_sig_loss(u), abs=1e-12)


@pytest.mark.parametrize("version", [1, 2])
def test_tdpo_formula_ln2_and_stop_gradient(version):
    sc, sr, rc, rr = (_rand(B) for _ in range(4))
    kc, kr = _rand(B).abs().requires_grad_(), _rand(B).abs().requires_grad_()
    beta, alpha = 0.1, 0.5
    out = L.tdpo(sc, sr, rc, rr, kc, kr, beta, alpha, version)
    u = []
    for i in range(B):
        dpo_u = beta * ((sc[i] - rc[i]) - (sr[i] - rr[i])).item()
        if version == 1:
            u.append(dpo_u - beta * (kr[i] - kc[i]).item())
        else:
            u.append(dpo_u - alpha * (beta * kr[i].item() - beta * kc[i].item()))
    assert out.losses.tolist() == pytest.approx(_sig_loss(u), abs=1e-12)
    out.losses.sum().backward()
    assert kr.grad.abs().sum() > 0
    if version == 2:
        assert kc.grad is None or torch.all(kc.grad == 0)  # sg on the chosen term
    else:
        assert kc.grad.abs().sum() > 0
    zero = torch.zeros(B, dtype=torch.float64)
    assert L.tdpo(sc, sr, sc, sr, zero, zero, beta, alpha, version).losses.tolist() == pytest.approx([LN2] * B)


def test_fpo_formula_ln2_and_stop_gradient():
    mc, mr, rmc, rmr = (_rand(B) for _ in range(4))
    dc, dr = _rand(B).abs().requires_grad_(), _rand(B).abs().requires_grad_()
    mc.requires_grad_()
    beta, alpha = 0.1, 0.5
    out = L.fpo(mc, mr, rmc, rmr, dc, dr, beta, alpha)
    u = [
        beta * (mc[i] - mr[i]).item()
        - beta * (rmc[i] - rmr[i]).item()
        - alpha * (beta * dr[i].item() - beta * dc[i].item())
        for i in range(B)
    ]
    assert out.losses.tolist() == pytest.approx(_sig_loss(u), abs=1e-12)
    out.losses.sum().backward()
    assert dc.grad is None or torch.all(dc.grad == 0)
    assert torch.all(dr.grad != 0) and torch.all(mc.grad != 0)
    zero = torch.zeros(B, dtype=torch.float64)
    at_ref = L.fpo(rmc, rmr, rmc, rmr, zero, zero, beta, alpha).losses
    assert at_ref.tolist() == pytest.approx([LN2] * B, abs=1e-12)


def test_masked_mean_divides_by_response_length():
    x = _rand(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    got = L.masked_mean(x, mask)
    assert torch.allclose(got[0], (x[0, 1] + x[0, 2]) / 2)
    assert torch.allclose(got[1], x[1].mean(0))


def _feature_mse_by_hand(pol, idx, val, k, w):
    out = []
    for i in range(pol.shape[0]):
        p = pol[i].tolist()
        ref = {int(j): float(v) for j, v in zip(idx[i], val[i]) if j >= 0}
        pol_top = sorted(range(len(p)), key=lambda j: -p[j])[:k]
        ref_top = sorted(ref, key=lambda j: -ref[j])[:k]
        union = set(pol_top) | set(ref_top)
        out.append(sum(w[j] * (p[j] - ref.get(j, 0.0)) ** 2 for j in union) / k)
    return out


def test_feature_mse_union_missing_reference_and_weights():
    d_sae, k, kc = 20, 3, 6
    pol = _rand(4, d_sae).abs()
    idx = torch.stack([torch.randperm(d_sae)[:kc] for _ in range(4)])
    val = _rand(4, kc).abs()
    idx[1, 4:] = -1  # a short cache row, padded
    w = torch.rand(d_sae, dtype=torch.float64) + 0.5
    got = L.feature_mse(pol, idx, val, k, w)
    assert got.tolist() == pytest.approx(_feature_mse_by_hand(pol, idx, val, k, w.tolist()), abs=1e-12)
    ones = L.feature_mse(pol, idx, val, k)
    assert ones.tolist() == pytest.approx(_feature_mse_by_hand(pol, idx, val, k, [1.0] * d_sae), abs=1e-12)


def test_feature_mse_policy_index_missing_from_cache_counts_zero():
    pol = torch.tensor([[0.0, 5.0, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[3, -1]])
    val = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    # k=1: topk(pol) = {1} (absent from the cache -> ref 0), topk(ref) = {3}.
    got = L.feature_mse(pol, idx, val, k=1)
    assert got.item() == pytest.approx((5.0 - 0.0) ** 2 + (1.0 - 2.0) ** 2)
    got.sum().backward()
    assert pol.grad.tolist()[0] == pytest.approx([0.0, 10.0, 0.0, -2.0])
    assert L.feature_mse(torch.tensor([[0.0, 0.0, 0.0, 2.0]], dtype=torch.float64), idx, val, 1).item() == 0.0
