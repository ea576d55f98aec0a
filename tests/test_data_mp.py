"""Every row format, and a mixture, trains one step on 2 ranks (one launch serves every stage)."""

import json
import math
import os
import re
from pathlib import Path

import pytest
from helpers import ROOT, subprocess_env, write_recipe

from fpo_ds import pipeline
from fpo_ds.tools.demo import toy

pytestmark = pytest.mark.multiproc
N = 8  # rows per format: two optimizer steps' worth at global batch 4


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


def shaped(fmt: str, p: dict, i: int) -> dict:
    """Toy pair `p` as a row of the public set that has format `fmt`."""
    q, c, r = p["prompt"], p["chosen"], p["rejected"]
    return {
        "standard": lambda: p,
        "ultrafeedback": lambda: {  # HuggingFaceH4/ultrafeedback_binarized
            "prompt": q,
            "prompt_id": f"{i:064x}",
            "chosen": [{"content": q, "role": "user"}, {"content": c, "role": "assistant"}],
            "rejected": [{"content": q, "role": "user"}, {"content": r, "role": "assistant"}],
            "messages": [{"content": q, "role": "user"}, {"content": c, "role": "assistant"}],
            "score_chosen": 8.0,
            "score_rejected": 4.0,
        },
        "implicit": lambda: {
            "chosen": f"\n\nHuman: {q}\n\nAssistant: {c}",
            "rejected": f"\n\nHuman: {q}\n\nAssistant: {r}",
        },
        "conversational": lambda: {"prompt": [_u(q)], "chosen": [_a(c)], "rejected": [_a(r)]},  # TRL, explicit
        "conversational_implicit": lambda: {"chosen": [_u(q), _a(c)], "rejected": [_u(q), _a(r)], "score_chosen": 8.0},
        "sft_messages": lambda: {  # HuggingFaceH4/ultrachat_200k
            "prompt": q,
            "prompt_id": f"{i:064x}",
            "messages": [{"content": q, "role": "user"}, {"content": c, "role": "assistant"}],
        },
        "sft_prompt_completion": lambda: {"prompt": [_u(q)], "completion": [_a(c)]},
        "sft_text": lambda: {"text": f"{q} {c}"},
    }[fmt]()


FORMATS = [
    "standard",
    "ultrafeedback",
    "implicit",
    "conversational",
    "conversational_implicit",
    "sft_messages",
    "sft_prompt_completion",
    "sft_text",
]


def _recipe(tmp: Path, world: Path, name: str, data: dict, method: str) -> str:
    """One short step on the given data (a file or a mix: the world's own file is not used)."""
    once = {"train": {"max_steps": 1}, "output": {"save_final": False}}
    return write_recipe(tmp, world, name, once, data={"path": None, **data}, loss={"method": method})


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data-mp")
    world = toy.write_world(tmp / "world", "llama", n_train=8, n_eval=4, layers=2)
    pairs = toy.toy_pairs(N, 5)
    spec = []
    for fmt in FORMATS:
        path = tmp / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(shaped(fmt, p, i)) + "\n" for i, p in enumerate(pairs)))
        method = "sft" if fmt.startswith("sft_") else "dpo"
        spec.append({"name": fmt, "stage": "train", "recipe": _recipe(tmp, world, fmt, {"path": str(path)}, method)})
    mix = {
        "mix": [
            {"path": str(tmp / "ultrafeedback.jsonl"), "weight": 1.0},
            {"path": str(tmp / "implicit.jsonl"), "count": 6, "format": "implicit"},
        ],
        "eval_fraction": 0.25,
    }
    spec.append({"name": "mix", "stage": "train", "recipe": _recipe(tmp, world, "mix", mix, "dpo")})
    # every tokenized set damaged (same size), then a run on one of them: rank 0 names it and rebuilds it
    spec.append({"name": "damage", "check": "damage_tokenized", "dir": str(tmp / "hf-datasets")})
    again = {"path": str(tmp / "standard.jsonl")}
    spec.append({"name": "rebuilt", "stage": "train", "recipe": _recipe(tmp, world, "rebuilt", again, "dpo")})
    out = tmp / "out"
    out.mkdir()
    (out / "spec.json").write_text(json.dumps(spec))
    entry = [str(ROOT / "tests" / "mp_driver.py"), str(out / "spec.json"), str(out)]
    port = 29500 + (os.getpid() + 7) % 1000
    env = subprocess_env(HF_DATASETS_CACHE=str(tmp / "hf-datasets"))  # the tokenized sets the test damages
    proc = pipeline.torchrun(entry, 2, port=port, env=env, cwd=ROOT, capture=True, timeout=900, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return {"results": json.loads((out / "results.json").read_text()), "log": log, "tmp": tmp}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_trains_one_step_on_two_ranks_and_logs_its_format(launched, fmt):
    res = launched["results"][fmt]
    assert res["n_pairs"] == N  # no row dropped (not as empty_prompt, not at all)
    assert len(res["history"]) == 1 and math.isfinite(res["history"][0]["loss"])
    assert re.search(rf"{fmt}\.jsonl \[train\]: format {fmt} \({N} rows\), detected; {N} pairs kept", launched["log"])
    assert "dropped" not in "".join(line for line in launched["log"].splitlines() if f"{fmt}.jsonl" in line)


def test_mixture_rows_per_source_are_logged_and_stored_with_the_run(launched):
    res = launched["results"]["mix"]
    info = json.loads((launched["tmp"] / "runs" / "mix" / "run_info.json").read_text())
    got = [(s["key"], s["rows_read"], s["rows_selected"], s["formats"]) for s in info["data_sources"]]
    # 8 rows each, a quarter held out: 6 train rows of ultrafeedback (weight), and a count of 6 HH rows
    assert got == [
        ("data.mix[0]", 8, 6, {"ultrafeedback": 6}),
        ("data.mix[1]", 8, 6, {"implicit": 6}),
    ]
    assert res["n_pairs"] == 12 and math.isfinite(res["history"][0]["loss"])
    assert "format implicit (6 rows), forced by data.format" in launched["log"]


def test_a_damaged_tokenized_set_is_named_and_rebuilt_on_two_ranks(launched):
    damaged = launched["results"]["damage"]["damaged"]
    assert len(damaged) == 12  # one set per format, and per source of the mixture: its training and held-out rows
    standard = [line for line in launched["log"].splitlines() if "the tokenized set is damaged" in line]
    assert len(standard) == 1 and "does not match its checksum (changed or truncated); rebuilding it" in standard[0]
    assert any(standard[0].split(": the tokenized set is damaged: ")[1].startswith(d) for d in damaged)
    res = launched["results"]["rebuilt"]
    assert res["n_pairs"] == N and math.isfinite(res["history"][0]["loss"])
