"""Response log-probs under DeepSpeed ZeRO-3 on 2 CPU ranks, with the LM heads partitioned.

The toy models' heads (384 x 64) are small enough to stay whole under ZeRO-3's default
persistence threshold; the driver sets it to 0, so every weight, both heads included, lives
partitioned and is all-gathered only by ZeRO-3's module hooks (the policy head) or around the KL's
chunk loops (the reference head). Losses and full gradients must equal the single-process
full-logits oracle, and each head is all-gathered once per forward and once per backward.
"""

import os
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env
from test_logps import oracle_outputs

from fpo_ds import model as M
from fpo_ds import objective as O
from fpo_ds import pipeline
from fpo_ds.config import LossConfig
from fpo_ds.tools.demo import toy

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parent.parent
TOL = dict(rtol=1e-5, atol=1e-5)


def _reference_dir(world: Path) -> Path:
    """The policy's checkpoint moved by noise, so the KL and the DPO-style margins are not 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = world / "model-ref"
    lm = AutoModelForCausalLM.from_pretrained(world / "model", dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    lm.save_pretrained(out)
    AutoTokenizer.from_pretrained(world / "model").save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["gemma2", "llama"])
def run(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"logps-{request.param}")
    world = toy.write_world(tmp / "world", request.param, n_train=8, n_eval=2)
    ref_dir = _reference_dir(world)
    out = tmp / "results.pt"
    entry = [str(ROOT / "tests" / "logps_mp_driver.py"), str(world / "model"), str(ref_dir), str(out)]
    port = 29500 + (os.getpid() + 7) % 1000
    proc = pipeline.torchrun(
        entry, 2, port=port, env=subprocess_env(), cwd=ROOT, capture=True, timeout=600, check=False
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return torch.load(out, weights_only=False), world / "model", ref_dir, request.param


def _oracle(method: str, policy_dir: Path, ref_dir: Path, batch):
    from transformers import AutoModelForCausalLM

    pol = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).requires_grad_(False)
    obj = O.build(LossConfig(method=method))
    pol_out, ref_sum = oracle_outputs(pol, ref, batch, obj.needs_kl)
    loss = obj.fn(pol_out, M.RefOut(ref_sum, ref_sum / pol_out.n_tokens)).losses.mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in pol.named_parameters()}


@pytest.mark.parametrize("method", ["simpo", "tdpo1"])
def test_zero3_losses_and_gradients_match_full_logits(run, method):
    res, policy_dir, ref_dir, _ = run
    assert res["partitioned"] == {"policy_head": "NOT_AVAILABLE", "ref_head": "NOT_AVAILABLE"}
    want, want_g = _oracle(method, policy_dir, ref_dir, res["batch"])
    for it in (0, 1, 2):
        got = res[f"{method}/{it}"]
        torch.testing.assert_close(got["loss"], want, **TOL)
        assert got["grads"].keys() == want_g.keys()
        for name, g in want_g.items():
            torch.testing.assert_close(got["grads"][name].view(g.shape), g, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_zero3_gathers_each_head_once_per_pass(run):
    """Five chunks per pass, yet each LM head weight is all-gathered at most once per forward and per backward.

    Seen: the policy head once in forward, and not again in backward once DeepSpeed has recorded
    its trace (it is the last module forward and the first backward, so it stays whole); while the
    trace is recorded (first iterations) a tied head is fetched by the embedding and by the head.
    The reference head: once in the reference's forward, once in each of the KL's chunk loops.
    """
    res, _, _, arch = run
    tied = arch == "gemma2"  # lm_head.weight is model.embed_tokens.weight
    for method in ("simpo", "tdpo1"):
        kl = method == "tdpo1"
        for it in (0, 1, 2):
            g = res[f"{method}/{it}"]["gathers"]
            assert g["policy_forward"]["policy_head"] in ((1, 2) if tied else (1,)), (method, it, g)
            assert g["backward"]["policy_head"] <= g["policy_forward"]["policy_head"], (method, it, g)
            assert g["policy_forward"]["ref_head"] == g["backward"]["ref_head"] == int(kl), (method, it, g)
            assert g["ref_forward"]["ref_head"] in ((1, 2) if kl else (0,)), (method, it, g)
        steady = res[f"{method}/2"]["gathers"]
        assert steady["policy_forward"]["policy_head"] == 1 and steady["backward"]["policy_head"] == 0, steady
        assert steady["ref_forward"]["ref_head"] == int(kl), steady
