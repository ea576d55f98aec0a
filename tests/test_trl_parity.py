"""fpo-ds against TRL, step by step: DPO, IPO, SimPO and DPO with LoRA trained by both on the same rows.

Same model directory, tokenizer and token ids (checked), the same pairs in the same order (TRL
is given the rows in the order fpo-ds's sampler consumes them and reads them sequentially; each
step is one micro-batch), fp32, AdamW at a constant lr of 1e-4 (the weights move: later steps
compare trained models), gradient clipping 1.0, a live reference for DPO and IPO. fpo-ds runs
through its real trainer (torchrun, one rank, ds_configs/zero3_fp32.json: the ZeRO stage every
recipe trains with, partitioned parameters and the response-only LM head included); TRL runs
its own DPOTrainer and CPOTrainer (loss_type simpo) in a second process at the same time.
Per step, loss, reward margin and gradient norm (before clipping) must agree to 1e-6 (relative
above 1, where float32's own spacing exceeds 1e-6: see _close). For LoRA (model.lora, PEFT) TRL's
DPOTrainer gets `peft_config` and no reference model, and its adapters are set to fpo-ds's
initial ones; both references are the model with its adapters off.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import subprocess_env

pytest.importorskip("trl", reason="TRL is not installed: pip install -e '.[dev]' brings the pinned trl")
pytest.importorskip("peft", reason="PEFT is not installed: pip install -e . brings the pinned peft")

from fpo_ds.tools.benchmarks import trl_run  # noqa: E402

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parent.parent
STEPS = 5
LR = 1e-4
BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "dpo-lora": 0.1}  # by run name
METHOD = {"dpo": "dpo", "ipo": "ipo", "simpo": "simpo", "dpo-lora": "dpo"}
# Pairs per step. IPO's rewards differ in meaning between the two (see test_ipo_rewards_are_length_normalised):
# with one pair per step the conversion between them is exact, so the margins are compared too.
BATCH = {"dpo": 4, "ipo": 1, "simpo": 4, "dpo-lora": 4}
# DPO with LoRA (model.lora through PEFT): TRL gets `peft_config` and no reference model, so its reference
# is the adapters-off model, as fpo-ds's. Adapters start with B = 0 and train at a larger lr than full weights.
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}
RUN_LORA = {"dpo-lora": LORA}
RUN_LR = {"dpo-lora": 1e-3}
TOL = 1e-6
# The toy template, with EOS closing each assistant turn: TRL's CPOTrainer appends EOS to a response
# that does not end with it, so only a response that already does gets the same token ids in both.
EOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _world(tmp: Path) -> Path:
    from transformers import AutoTokenizer

    from fpo_ds.tools.demo import toy

    world = toy.write_world(tmp / "world", "gemma2", n_train=32, n_eval=4)
    tok = AutoTokenizer.from_pretrained(world / "model")
    tok.chat_template = EOS_TEMPLATE
    tok.save_pretrained(world / "model")
    return world


def _recipe(tmp: Path, world: Path, name: str) -> Path:
    raw = {
        "model": {"name_or_path": str(world / "model"), "lora": RUN_LORA.get(name, {"r": 0})},
        "data": {"path": str(world / "data" / "train.jsonl"), "max_length": 64, "max_prompt_length": 32},
        "loss": {"method": METHOD[name], "beta": BETA[name], "gamma_beta_ratio": 0.5, "reference": "live"},
        "train": {
            "global_batch_size": BATCH[name],  # = micro batch x 1 rank: one micro-batch per step
            "micro_batch_size": BATCH[name],
            "lr": RUN_LR.get(name, LR),
            "warmup_steps": 0,
            "schedule": "constant",
            "max_steps": STEPS,
        },
        "deepspeed": {"config": str(ROOT / "ds_configs" / "zero3_fp32.json"), "timeout_minutes": 3},
        "logging": {"progress_bar": False},
        "output": {"dir": str(tmp / "fpo-ds" / name)},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _order(recipe_path: Path) -> list:
    """The pairs fpo-ds trains on, step by step, in its order (tokenised as the trainer tokenises them)."""
    from fpo_ds import config as C
    from fpo_ds import data
    from fpo_ds import model as M

    recipe = C.load(recipe_path)
    pairs, _ = data.load_pairs(recipe.data, M.load_tokenizer(recipe.model.name_or_path))
    micro = recipe.train.micro_batch_size  # = the global batch: one micro-batch per step, on one rank
    return [pairs[j] for j in trl_run.fpo_ds_order(pairs, recipe.data.seed, STEPS, micro, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from fpo_ds import pipeline

    tmp = tmp_path_factory.mktemp("trl")
    world = _world(tmp)
    rows = [json.loads(x) for x in (world / "data" / "train.jsonl").read_text().splitlines()]
    recipes = {m: _recipe(tmp, world, m) for m in BETA}
    order = {m: _order(recipes[m]) for m in BETA}
    trl_runs = [
        {"name": m, "method": METHOD[m], "beta": BETA[m], "lr": RUN_LR.get(m, LR), "steps": STEPS, "batch": BATCH[m]}
        | {"gamma_beta_ratio": 0.5, "lora": RUN_LORA.get(m)}
        for m in BETA
    ]
    spec = {"model": str(world / "model"), "out": str(tmp / "trl"), "max_length": 64, "runs": trl_runs}
    # One TRL process trains the three runs in turn; every run gets the rows of its own fpo-ds order.
    for r in trl_runs:
        one = {**spec, "runs": [r], "rows": [rows[p.example_id] for p in order[r["name"]]]}
        (tmp / f"trl-{r['name']}.json").write_text(json.dumps(one))
    script = "import sys; from fpo_ds.tools.benchmarks import trl_run; [trl_run.main([a]) for a in sys.argv[1:]]"
    cmd = [sys.executable, "-c", script] + [str(tmp / f"trl-{m}.json") for m in BETA]
    log = open(tmp / "trl.log", "w")
    trl = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        plan = [{"stage": "train", "recipe": str(recipes[m]), "overrides": []} for m in BETA]
        (tmp / "plan.json").write_text(json.dumps(plan))
        pipeline.torchrun(
            ["-m", "fpo_ds.pipeline", str(tmp / "plan.json")], 1, env=subprocess_env(), cwd=ROOT, capture=True
        )
    finally:
        code = trl.wait(timeout=600)
        log.close()
    assert code == 0, (tmp / "trl.log").read_text()[-6000:]
    assert trl_run.TRL_VERSION == __import__("trl").__version__, "the matched settings were checked for this TRL"
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
    return {
        m: {
            "fpo": read(tmp / "fpo-ds" / m / "metrics.jsonl"),
            "trl": read(tmp / "trl" / m / "metrics.jsonl"),
            "tokens": json.loads((tmp / "trl" / m / "tokens.json").read_text()),
            "order": order[m],
        }
        for m in BETA
    }


@pytest.mark.parametrize("method", list(BETA))
def test_same_token_ids_in_the_same_order(runs, method):

    assert runs[method]["tokens"] == [trl_run.token_ids(p) for p in runs[method]["order"]]


# Compared per method: the loss, the gradient norm, and the logged quantities that mean the same in both.
# IPO's rewards are compared after conversion (test_ipo_rewards_are_length_normalised). SimPO's logps/*
# are not compared: TRL's CPOTrainer logs the per-token means it trains on, fpo-ds the sums (as DPO does in
# both); the means enter the comparison through rewards/* (beta * mean log-prob in both).
KEYS = {
    "dpo": trl_run.STEP_KEYS,  # loss, grad_norm, rewards/chosen|rejected|margins, logps/chosen|rejected
    "dpo-lora": trl_run.STEP_KEYS,
    "ipo": ("loss", "grad_norm", "logps/chosen", "logps/rejected"),
    "simpo": ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins"),
}


def _close(a: float, b: float, scale: float = 1.0) -> bool:
    """|a - b| <= 1e-6 absolute for values up to 1 (losses, margins); 1e-6 relative above (about 16 fp32 ulps).

    Above 1 the float32 grid itself is coarser than 1e-6 (summed log-probs near 34 have a spacing of
    3.8e-6; IPO's gradient norms reach 50 and its loss starts at 25): measured differences there were
    up to 7e-7 relative, under 1e-6 relative.
    """
    return abs(a - b) <= TOL * max(1.0, abs(b)) * scale


@pytest.mark.parametrize("method", list(BETA))
def test_loss_margin_and_gradient_norm_match_trl(runs, method):
    fpo, trl = runs[method]["fpo"], runs[method]["trl"]
    assert [x["step"] for x in fpo] == [x["step"] for x in trl] == list(range(1, STEPS + 1))
    for a, b in zip(fpo, trl):
        for key in KEYS[method]:
            assert _close(a[key], b[key]), (method, a["step"], key, a[key], b[key])
    assert abs(fpo[-1]["loss"] - fpo[0]["loss"]) > 1e-3  # the weights moved: later steps compare trained models


def test_ipo_rewards_are_length_normalised(runs):
    """fpo-ds's IPO reward is beta * log-ratio / |y| (what IPO's loss regresses); TRL logs beta * log-ratio.

    With one pair per step, fpo-ds's reward times the response length is TRL's.
    """
    r = runs["ipo"]
    assert len(r["fpo"]) == len(r["trl"]) == len(r["order"]) == STEPS  # one pair per step, every step compared
    for a, b, pair in zip(r["fpo"], r["trl"], r["order"]):
        n_c, n_r = len(pair.chosen_ids), len(pair.rejected_ids)
        assert _close(a["rewards/chosen"] * n_c, b["rewards/chosen"], n_c), (a["step"], a, b)
        assert _close(a["rewards/rejected"] * n_r, b["rewards/rejected"], n_r), (a["step"], a, b)
        assert _close(a["rewards/margins"], b["rewards/chosen"] / n_c - b["rewards/rejected"] / n_r), (a["step"], a, b)
