"""Response-only, chunked log-probs (model.ResponseLM) against the full-logits computation they replaced.

The oracle below is the previous production path: the Hugging Face forward's (2b, T, V) logits,
then log-softmax per position and the full-vocabulary KL. Every method's loss and every policy
gradient must agree to 1e-5 in fp32, on tiny Gemma2 (tied embeddings; softcapping as configured,
strong, and off) and Llama models, with chunks small enough that every batch spans several.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fpo_ds import data
from fpo_ds import losses as L
from fpo_ds import model as M
from fpo_ds import objective as O
from fpo_ds.config import LossConfig
from fpo_ds.tools.demo import toy

METHODS = ["sft", "dpo", "ipo", "simpo", "tdpo1", "tdpo2", "fpo"]
VARIANTS = {  # name -> (arch, final_logit_softcapping override or "keep")
    "gemma2": ("gemma2", "keep"),  # Gemma2Config's default cap, 30
    "gemma2-cap0.5": ("gemma2", 0.5),  # small enough that tanh is far from linear on these logits
    "gemma2-nocap": ("gemma2", None),
    "llama": ("llama", "keep"),
}
# Every other model type model.SOFTCAP_ATTR accepts: its log-probs, KL and mean logits against the HF forward.
OTHER_MODELS = {a: (a, "keep") for a in ("gemma", "mistral", "qwen2")}
TOL = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the oracle (old full-logits path)


def token_logps(logits, labels):
    """(B, T, V), (B, T) -> (B, T): log-softmax at the label; 0 where ignored."""
    mask = labels != data.IGNORE_INDEX
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return lp * mask


def sequence_kl(ref_logits, pol_logits, mask):
    """Sum over response positions of KL(pi_ref || pi_theta) over the full vocabulary. -> (B,)."""
    ref_lp, pol_lp = F.log_softmax(ref_logits.float(), -1), F.log_softmax(pol_logits.float(), -1)
    return ((ref_lp.exp() * (ref_lp - pol_lp)).sum(-1) * mask).sum(-1)


def oracle_outputs(pol, ref, batch, needs_kl):
    """(policy SeqOut, reference (sum, n)) from the full logits."""
    labels = batch.labels[:, 1:]
    mask = labels != data.IGNORE_INDEX
    logits = pol(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    with torch.no_grad():
        ref_logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    n = mask.sum(-1).float()
    kl = sequence_kl(ref_logits, logits, mask) if needs_kl else None
    return M.SeqOut(token_logps(logits, labels).sum(-1), n, kl), token_logps(ref_logits, labels).sum(-1)


def new_outputs(pol, ref, batch, needs_kl):
    with torch.no_grad():
        r = M.sequence_logps(ref, batch, keep_hidden=needs_kl)
    return M.sequence_logps(pol, batch, r.ref_head), r.sum_logps


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logps")
    return {a: toy.write_world(tmp / a, a, n_train=16, n_eval=4) for a in ("gemma2", "llama", *OTHER_MODELS)}


def _batch(world: Path, n_pairs: int = 3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world / "model")
    rows = [json.loads(x) for x in (world / "data" / "train.jsonl").read_text().splitlines()]
    pairs, _ = data.build_pairs(rows[: n_pairs + 2], tok, 48, 24, "drop", "test")
    return data.collate(pairs[:n_pairs], tok.pad_token_id)


def _models(world: Path, cap, dtype=torch.float32):
    """Policy and reference: the same checkpoint, each moved off it by its own noise (so KL and margins are not 0)."""
    from transformers import AutoModelForCausalLM

    out = []
    for seed in (1, 2):
        lm = AutoModelForCausalLM.from_pretrained(world / "model", dtype=dtype)
        if cap != "keep":
            lm.config.final_logit_softcapping = cap
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lm.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(dtype))
        out.append(lm)
    out[1].requires_grad_(False)
    return out


def _loss_and_grads(method, pol, ref, batch, outputs):
    """The objective's mean loss and d loss / d policy parameters, from (policy, reference) outputs."""
    obj = O.build(LossConfig(method=method), k=4)
    needs_kl = obj.needs_kl
    tap = M.ResidualTap(pol, 1) if method == "fpo" else None
    if tap:
        tap.arm()
    pol_out, ref_sum = outputs(pol, ref, batch, needs_kl)
    ref_out, feats = M.RefOut(ref_sum, ref_sum / pol_out.n_tokens), None
    if method == "fpo":  # a fixed random ReLU encoder on block 1's residual stream, and a fixed "cache"
        g = torch.Generator().manual_seed(3)
        w_enc = torch.randn(pol.config.hidden_size, 12, generator=g)
        feats = L.masked_mean(torch.relu(tap.take() @ w_enc), batch.labels != data.IGNORE_INDEX)
        idx = torch.randint(0, 12, (feats.shape[0], 5), generator=g)
        ref_out = ref_out._replace(feat_idx=idx, feat_val=torch.rand(idx.shape, generator=g))
        tap.remove()
    loss = obj.fn(pol_out, ref_out, feats).losses.mean()
    pol.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in pol.named_parameters()}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_full_logits(worlds, monkeypatch, variant, method):
    arch, cap = VARIANTS[variant]
    monkeypatch.setattr(L, "LOGIT_CHUNK", 7)  # ~50 response positions per batch: several chunks, one ragged
    pol, ref = _models(worlds[arch], cap)
    batch = _batch(worlds[arch])
    want, want_g = _loss_and_grads(method, pol, ref, batch, oracle_outputs)
    got, got_g = _loss_and_grads(method, pol, ref, batch, new_outputs)
    torch.testing.assert_close(got, want, **TOL)
    assert got_g.keys() == want_g.keys()
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("variant", [*VARIANTS, *OTHER_MODELS])
def test_sequence_values_and_kl_match(worlds, variant):
    arch, cap = {**VARIANTS, **OTHER_MODELS}[variant]
    pol, ref = _models(worlds[arch], cap)
    batch = _batch(worlds[arch], 4)
    with torch.no_grad():
        want, want_ref = oracle_outputs(pol, ref, batch, True)
        got, got_ref = new_outputs(pol, ref, batch, True)
    for a, b in ((got.sum_logps, want.sum_logps), (got.n_tokens, want.n_tokens), (got.kl, want.kl)):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(got_ref, want_ref, **TOL)
    assert (want.kl > 1e-4).all()  # the two models differ: the KL check is not vacuous
    assert got.ref_head is None


@pytest.mark.parametrize("variant", [*VARIANTS, *OTHER_MODELS])
@pytest.mark.parametrize("with_kl", [False, True])
def test_mean_logits_match_the_hf_forward(worlds, monkeypatch, variant, with_kl):
    """TRL's logits/*: per sequence, the sum over response positions of the vocabulary-mean logit."""
    arch, cap = {**VARIANTS, **OTHER_MODELS}[variant]
    monkeypatch.setattr(L, "LOGIT_CHUNK", 7)
    pol, ref = _models(worlds[arch], cap)
    batch = _batch(worlds[arch], 4)
    mask = batch.labels[:, 1:] != data.IGNORE_INDEX
    with torch.no_grad():
        logits = pol(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        want = (logits.float().mean(-1) * mask).sum(-1)
        r = M.sequence_logps(ref, batch, keep_hidden=True) if with_kl else None
        got = M.sequence_logps(pol, batch, r.ref_head if r else None)
    torch.testing.assert_close(got.sum_mean_logits, want, **TOL)
    assert want.abs().min() > 1e-4  # not vacuous


def test_response_lm_keeps_hf_names_logits_and_blocks(worlds):
    pol, _ = _models(worlds["gemma2"], "keep")
    wrapped = M.ResponseLM(pol)
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in pol.named_parameters()]
    assert list(wrapped.state_dict()) == list(pol.state_dict())  # checkpoints export to the HF model unchanged
    assert wrapped.lm_head.weight is pol.model.embed_tokens.weight  # tied: one parameter, gradients summed
    assert M.decoder_layers(wrapped) is M.decoder_layers(pol)
    batch = _batch(worlds["gemma2"])
    with torch.no_grad():
        want = pol(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got = wrapped(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(got, want)  # the plain forward is the HF forward, softcapping included


def test_residual_tap_fires_once_through_response_path(worlds):
    pol, _ = _models(worlds["llama"], "keep")
    batch = _batch(worlds["llama"])
    tap = M.ResidualTap(pol, 2)
    tap.arm()
    M.sequence_logps(pol, batch)
    assert tap.take().shape == (*batch.input_ids.shape, pol.config.hidden_size)
    with pytest.raises(RuntimeError, match="did not fire"):
        tap.take()


def test_no_logits_are_saved_for_backward(worlds, monkeypatch):
    """Autograd keeps the hidden states and per-position scalars, never a tensor with a vocabulary axis."""
    monkeypatch.setattr(L, "LOGIT_CHUNK", 7)
    pol, ref = _models(worlds["gemma2"], 0.5)
    batch = _batch(worlds["gemma2"])
    vocab, saved = pol.config.vocab_size, []

    def pack(t):
        saved.append((tuple(t.shape), t.data_ptr()))
        return t

    with torch.no_grad():
        r = M.sequence_logps(ref, batch, keep_hidden=True).ref_head
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        M.sequence_logps(pol, batch, r)
    weight = pol.lm_head.weight.data_ptr()
    big = [s for s, ptr in saved if vocab in s and ptr != weight]
    assert not big, big


def test_unsupported_model_type_is_refused(worlds):
    pol, _ = _models(worlds["llama"], "keep")
    pol.config.model_type = "cohere"  # its forward multiplies the logits by logit_scale
    with pytest.raises(ValueError, match="cohere.*not supported.*supported: \\['gemma', 'gemma2', 'llama'"):
        M.ResponseLM(pol)


def test_engine_around_plain_hf_model_is_refused(worlds):
    pol, _ = _models(worlds["llama"], "keep")

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(TypeError, match="build it around model.ResponseLM"):
        M.sequence_logps(Engine(pol), _batch(worlds["llama"]))


def test_bf16_close_to_full_logits(worlds):
    """bf16: the same ops in the same dtype before the fp32 upcast, so the values agree to bf16 rounding."""
    pol, ref = _models(worlds["gemma2"], 0.5, torch.bfloat16)
    batch = _batch(worlds["gemma2"])
    with torch.no_grad():
        want, _ = oracle_outputs(pol, ref, batch, True)
        got, _ = new_outputs(pol, ref, batch, True)
    torch.testing.assert_close(got.sum_logps, want.sum_logps, rtol=0, atol=1e-3)
    torch.testing.assert_close(got.kl, want.kl, rtol=0, atol=1e-3)


def test_every_supported_model_type_is_preloaded_and_has_a_tiny_model(tmp_path):
    """zero.Init breaks lazy imports: each SOFTCAP_ATTR type's modeling code is imported before it (fresh process)."""
    import subprocess
    import sys

    kinds = sorted(M.SOFTCAP_ATTR)
    assert set(kinds) == {"gemma2", "llama", *OTHER_MODELS}  # each one has a tiny model in this file's tests
    code = (
        "import sys; from fpo_ds import model as M; M._preload_model_code(); "
        f"print([k for k in {kinds!r} if f'transformers.models.{{k}}.modeling_{{k}}' not in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
