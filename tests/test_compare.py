"""The paper's comparison workflow: settings, the job graph of slurm/compare.sh, the report, end to end.

The fast tests resolve the settings for every size, submit the graph to a stand-in `sbatch` that
records what it is given, and fill the report from planted files. The multiproc test runs
`slurm/compare.sh tiny` on the real test Slurm (tests/infra/slurm_up.sh) and checks every stage.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import need_infra, subprocess_env

from fpo_ds import cli
from fpo_ds import config as C
from fpo_ds.tools.comparison import jobs as compare_plan
from fpo_ds.tools.comparison import report as compare
from fpo_ds.tools.demo import toy

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
QUESTIONS = [
    f"--alpaca-eval={FIXTURES / 'alpaca_eval.json'}",
    f"--arena-hard={FIXTURES / 'arena_hard_question.jsonl'}",
    f"--mt-bench={FIXTURES / 'mt_bench_question.jsonl'}",
]
ROWS = ["sft", *compare_plan.METHODS]


def _fake_world(path: Path) -> Path:
    """Just enough of a tiny world for planning (nothing loads the model or the SAE at planning time)."""
    (path / "model").mkdir(parents=True)
    (path / "model" / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 4}))
    (path / "sae").mkdir()
    (path / "sae" / "cfg.json").write_text("{}")
    return path


def _plan(tmp_path: Path, *argv: str) -> dict:
    args = compare_plan.parse(list(argv))
    plan = compare_plan.build(args, compare_plan.yaml.safe_load(compare_plan.SETTINGS.read_text()))
    return compare_plan.add_answers(plan, compare_plan._questions(args))


def _recipe(stage: dict) -> C.Recipe:
    return C.load(stage["recipe"], stage["overrides"])


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("size", ["2b", "9b"])
def test_paper_settings_for_every_method(tmp_path, size):
    plan = _plan(tmp_path, size, "--root", str(tmp_path / "r"), "--sft-model", "/ckpt/sft")
    got = {m: _recipe(plan["stages"][m]) for m in compare_plan.METHODS}
    for m, r in got.items():
        t = r.train
        assert (t.lr, t.warmup_steps, t.schedule, t.epochs, t.global_batch_size) == (5e-7, 150, "constant", 1, 32)
        assert t.optimizer == ("rmsprop" if size == "9b" else "adamw")
        assert r.model.gradient_checkpointing and r.model.name_or_path == "/ckpt/sft"
        assert r.data.eval_split == "test_prefs" and r.loss.method == m
        assert r.output.dir == str(tmp_path / "r" / "runs" / m)
    assert {m: r.loss.resolved_beta for m, r in got.items()} == {
        "dpo": 0.1,
        "tdpo1": 0.1,
        "tdpo2": 0.1,
        "simpo": 2.0,
        "fpo": 0.1,
    }
    assert got["tdpo2"].loss.alpha == got["fpo"].loss.alpha == 0.5
    assert got["simpo"].loss.gamma_beta_ratio == 0.5 and got["dpo"].loss.reference == "live"
    assert got["fpo"].sae.k == 50 and got["fpo"].cache.dir == str(tmp_path / "r" / "cache")
    assert got["fpo"].sae.sae_id == (
        "layer_41/width_16k/average_l0_52" if size == "9b" else "layer_25/width_16k/average_l0_55"
    )
    # Only FPO reads the cache, which is built from FPO's own recipe (its SAE, k and data).
    assert [m for m in compare_plan.METHODS if plan["stages"][m]["needs_cache"]] == ["fpo"]
    cache = _recipe(plan["stages"]["cache"])
    assert (cache.sae, cache.data, cache.cache) == (got["fpo"].sae, got["fpo"].data, got["fpo"].cache)


def test_sft_stage_uses_the_base_model_and_feeds_every_method(tmp_path):
    plan = _plan(tmp_path, "2b", "--root", str(tmp_path / "r"), "--sft", "train.max_steps=7")
    sft = _recipe(plan["stages"]["sft"])
    assert sft.loss.method == "sft" and sft.model.name_or_path == "google/gemma-2-2b"
    assert (sft.data.split, sft.data.eval_split, sft.train.max_steps) == ("train_sft", "test_prefs", 7)
    # the paper's SFT data (UltraChat's messages rows), held out on the methods' UltraFeedback pairs
    assert (sft.data.path, sft.data.eval_path) == (
        "HuggingFaceH4/ultrachat_200k",
        "HuggingFaceH4/ultrafeedback_binarized",
    )
    exported = str(tmp_path / "r" / "models" / "sft")
    assert plan["sft"] == {"source": "trained", "model": exported}
    assert all(_recipe(plan["stages"][m]).model.name_or_path == exported for m in compare_plan.METHODS)
    assert all(_recipe(plan["stages"][m]).train.max_steps == 7 for m in compare_plan.METHODS)


def test_sft_stage_reads_a_given_ultrachat_shaped_source(tmp_path):
    rows = tmp_path / "ultrachat.jsonl"
    row = {
        "prompt": "q",
        "prompt_id": "0" * 64,
        "messages": [{"content": "q", "role": "user"}, {"content": "a", "role": "assistant"}],
    }
    rows.write_text(json.dumps(row) + "\n")
    world = str(_fake_world(tmp_path / "w"))
    plan = _plan(tmp_path, "tiny", "--root", str(tmp_path / "r"), "--world", world, "--sft", "--sft-data", str(rows))
    sft = _recipe(plan["stages"]["sft"])
    assert (sft.loss.method, sft.data.path, sft.data.split) == ("sft", str(rows), "train")
    assert all(_recipe(plan["stages"][m]).data.path == f"{world}/data/train.jsonl" for m in compare_plan.METHODS)
    with pytest.raises(ValueError, match="--sft-data: the SFT stage runs only with --sft"):
        _plan(tmp_path, "tiny", "--root", str(tmp_path / "r"), "--world", world, "--sft-data", str(rows))


def test_planner_refuses_a_mistake_before_queueing(tmp_path):
    args = ["tiny", "--root", str(tmp_path / "r"), "--world", str(_fake_world(tmp_path / "w")), "loss.betta=1"]
    with pytest.raises(SystemExit) as e:
        compare_plan.main(args)
    assert "loss.betta: unknown key (did you mean loss.beta?)" in str(e.value)
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1}\n')
    with pytest.raises(SystemExit) as e:
        compare_plan.main(["2b", "--root", str(tmp_path / "r"), f"--mt-bench={bad}"])
    assert f"{bad}: line 1: 'turns' is None" in str(e.value)
    assert not (tmp_path / "r" / "compare.json").exists()


# ----------------------------------------------------------------------------- the job graph


FAKE_SBATCH = """#!/bin/bash
# Records its arguments (one line per call) and answers like `sbatch --parsable`; from call number
# SBATCH_FAIL_AT on, answers like an sbatch with no Slurm to reach.
n=$(( $(wc -l < "$SBATCH_LOG") + 101 ))
if [ $(( n - 100 )) -ge "${SBATCH_FAIL_AT:-1000}" ]; then
  echo "sbatch: error: Could not establish a configuration source" >&2
  exit 1
fi
printf '%s\\n' "$n $*" >> "$SBATCH_LOG"
echo "$n"
"""


def _compare_sh(tmp_path: Path, *argv: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run slurm/compare.sh against a stand-in sbatch (its calls logged in tmp_path/sbatch.log)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log.write_text("")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SBATCH_LOG=str(log), PYTHON=sys.executable)
    env.update(extra_env or {})
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run(
        ["bash", str(ROOT / "slurm" / "compare.sh"), *argv],
        env=env,
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=120,
    )


def _submit_with_fake_sbatch(tmp_path: Path, *argv: str, extra_env: dict | None = None) -> list[tuple[str, str]]:
    """Run slurm/compare.sh against a stand-in sbatch; returns (job id, arguments) per submission."""
    proc = _compare_sh(tmp_path, *argv, extra_env=extra_env)
    assert proc.returncode == 0, proc.stderr
    return [tuple(line.split(" ", 1)) for line in (tmp_path / "sbatch.log").read_text().splitlines()]


def _jobs(calls: list[tuple[str, str]]) -> dict[str, dict]:
    """Job name (cmp-<name>) -> {id, dependency, args}."""
    out = {}
    for job, args in calls:
        name = args.split("--job-name=cmp-", 1)[1].split()[0]
        dep = args.split("--dependency=", 1)[1].split()[0] if "--dependency=" in args else ""
        out[name] = {"id": job, "dep": dep, "args": args}
    return out


def test_job_graph_waits_only_for_what_each_job_reads(tmp_path):
    root = tmp_path / "r"
    calls = _submit_with_fake_sbatch(
        tmp_path,
        "2b",
        "--root",
        str(root),
        "--sft",
        *QUESTIONS,
        extra_env={"SBATCH_EXTRA": "--partition=gpu", "SBATCH_GENERATE": "--ntasks-per-node=1"},
    )
    jobs = _jobs(calls)
    assert list(jobs) == [
        "sft", "sft-export", "cache",
        "dpo", "dpo-generate", "tdpo1", "tdpo1-generate", "tdpo2", "tdpo2-generate",
        "simpo", "simpo-generate", "fpo", "fpo-generate", "sft-generate", "report",
    ]  # fmt: skip
    ids = {n: j["id"] for n, j in jobs.items()}
    assert jobs["sft"]["dep"] == "" and jobs["sft-export"]["dep"] == f"afterok:{ids['sft']}"
    assert jobs["cache"]["dep"] == f"afterok:{ids['sft-export']}"
    for m in ("dpo", "tdpo1", "tdpo2", "simpo"):  # live reference or none: no wait for the cache
        assert jobs[m]["dep"] == f"afterok:{ids['sft-export']}"
    assert jobs["fpo"]["dep"] == f"afterok:{ids['cache']}"
    for m in compare_plan.METHODS:
        assert jobs[f"{m}-generate"]["dep"] == f"afterok:{ids[m]}"
        assert f"--from {root}/runs/{m} --export-dtype bfloat16 {root}/models/{m}" in jobs[f"{m}-generate"]["args"]
    assert jobs["sft-generate"]["dep"] == f"afterok:{ids['sft-export']}"
    others = {i for n, i in ids.items() if n != "report"}
    assert jobs["report"]["dep"].startswith("afterany:") and set(jobs["report"]["dep"][9:].split(":")) == others
    assert all("--partition=gpu" in j["args"] and "--kill-on-invalid-dep=yes" in j["args"] for j in jobs.values())
    assert all(("--ntasks-per-node=1" in j["args"]) == n.endswith("-generate") for n, j in jobs.items())
    assert "slurm/train.sh" in jobs["fpo"]["args"] and "loss.method=fpo" in jobs["fpo"]["args"]
    assert (root / "jobs.tsv").read_text().count("\n") == len(jobs)


def test_job_graph_without_sft_or_questions(tmp_path):
    jobs = _jobs(_submit_with_fake_sbatch(tmp_path, "9b", "--root", str(tmp_path / "r"), "--methods", "simpo,fpo"))
    assert list(jobs) == ["cache", "simpo", "fpo", "report"]
    assert jobs["cache"]["dep"] == jobs["simpo"]["dep"] == "" and jobs["fpo"]["dep"] == f"afterok:{jobs['cache']['id']}"


def test_compare_sh_tiny_plans_with_deepspeed_logging_and_stops_at_the_first_failed_sbatch(tmp_path):
    # As a user with the venv active runs it: no DS_ACCELERATOR, so DeepSpeed logs its accelerator
    # choice while the tiny world is written; that line must not reach the plan slurm/compare.sh evaluates.
    # The third sbatch fails like an sbatch with no Slurm to reach.
    root = tmp_path / "r"
    proc = _compare_sh(tmp_path, "tiny", "--root", str(root), extra_env={"DS_ACCELERATOR": None, "SBATCH_FAIL_AT": "3"})
    assert proc.returncode == 1, proc.stderr
    assert "command not found" not in proc.stderr and (root / "compare.json").is_file()  # past planning
    assert "Setting accelerator to CPU" in proc.stderr  # DeepSpeed did log, on stderr
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    ids = [line.split()[0] for line in calls]
    assert len(calls) == 2 and "Could not establish a configuration source" in proc.stderr
    assert "slurm/compare.sh: sbatch of job 'tdpo1' failed (exit 1); nothing more is submitted." in proc.stderr
    assert f"Already queued: {ids[0]} {ids[1]} (`scancel {ids[0]} {ids[1]}` to drop them)" in proc.stderr
    assert "report job" not in proc.stderr + proc.stdout
    rows = [line.split("\t") for line in (root / "jobs.tsv").read_text().splitlines()]
    assert [r[:2] for r in rows] == [["cache", ids[0]], ["dpo", ids[1]]]  # no empty job id


# ----------------------------------------------------------------------------- the report


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _planted(tmp_path: Path) -> Path:
    """A finished tiny comparison's files, by hand: every number below is asserted in the table."""
    root = tmp_path / "r"
    args = ["tiny", "--root", str(root), "--world", str(_fake_world(tmp_path / "w")), "--sft", *QUESTIONS]
    compare_plan.main(args)
    plan = json.loads((root / "compare.json").read_text())
    for i, row in enumerate(ROWS):
        run = Path(plan["rows"][row]["run_dir"])
        ev = {"eval_loss": 0.5 + i, "eval_accuracy/length_normalised": 0.5 + 0.05 * i}
        if row not in ("sft", "simpo"):  # SimPO and SFT have no reference: no DPO-reward accuracy
            ev["eval_accuracy/dpo_reward"] = 0.25
        if row == "fpo":
            ev |= {"eval_fpo/feature_mse_chosen": 0.0125, "eval_fpo/feature_mse_rejected": 0.5}
        # a training record, then the held-out one, then a torn line: the last complete eval record counts
        _write_jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6, **ev}])
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 3, "eval_loss"')
        (run / "DONE.json").write_text("{}")
        if row == "dpo":
            continue  # DPO's answers are missing: its benchmark cells must stay empty
        for fmt, path in plan["rows"][row]["answers"].items():
            _plant_answers(fmt, Path(path), plan["rows"][row]["model_id"], n=5)
    return root


def _plant_answers(fmt: str, path: Path, model_id: str, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "alpaca_eval":
        path.write_text(
            json.dumps([{"instruction": f"q{i}", "output": "abcd", "generator": model_id} for i in range(n)])
        )
    elif fmt == "arena_hard":
        msg = lambda i: [{"role": "user", "content": "q"}, {"role": "assistant", "content": {"answer": "ab"}}]  # noqa: E731
        _write_jsonl(path, [{"uid": str(i), "model": model_id, "messages": msg(i)} for i in range(n)])
    else:
        _write_jsonl(path, [{"question_id": i, "choices": [{"index": 0, "turns": ["a", "abc"]}]} for i in range(n)])
    Path(f"{path}.settings.json").write_text(json.dumps({"answers_cut_at_max_new_tokens": 1}))


def _plant_judges(root: Path) -> None:
    """Judge results in each tool's own output format (AlpacaEval CSV, Arena-Hard text, FastChat jsonl)."""
    lb = root / "judge" / "alpaca_eval" / "weighted_alpaca_eval_gpt4_turbo" / "leaderboard.csv"
    lb.parent.mkdir(parents=True)
    lb.write_text(
        ",win_rate,standard_error,n_wins,n_total,avg_length,length_controlled_winrate,lc_standard_error\n"
        "fpo-ds-tiny-fpo,10.5,1.0,80,805,1500,12.25,0.5\n"
        "fpo-ds-tiny-simpo,9.0,1.0,70,805,1600,,0.5\n"  # no LC value: that cell stays empty
        "gpt4_1106_preview,50.0,0.0,400,805,2000,50.0,0.0\n"
    )
    (root / "judge" / "arena_hard.txt").write_text(
        "##### Category: hard_prompt #####\n"
        "                Model  Scores         CI (%)\n"
        "0  o3-mini-2025-01-31   0.503  (-1.2 / +1.0)\n"
        "1     fpo-ds-tiny-fpo   0.128  (-0.9 / +0.8)\n"
        "##### Category: creative_writing #####\n"
        "0     fpo-ds-tiny-fpo   0.400  (-0.9 / +0.8)\n"  # a later category: the first block counts
    )
    (root / "judge" / "arena_hard_v01.txt").write_text(
        "gpt-4-0314                     | score: 50.0  | 95% CI:  (0.0, 0.0)  | average #tokens: 423\n"
        "fpo-ds-tiny-tdpo2              | score: 7.5   | 95% CI: (-1.1, 1.0)  | average #tokens: 512\n"
    )
    judgment = [
        {"question_id": 81, "model": "fpo-ds-tiny-fpo", "score": 6, "turn": 1},
        {"question_id": 81, "model": "fpo-ds-tiny-fpo", "score": 7, "turn": 2},
        {"question_id": 93, "model": "fpo-ds-tiny-fpo", "score": -1, "turn": 1},  # a failed judgment: dropped
        {"question_id": 81, "model": "fpo-ds-tiny-sft", "score": 4, "turn": 1},
    ]
    _write_jsonl(root / "judge" / "mt_bench" / "gpt-4_single.jsonl", judgment)
    (root / "judge" / "scores.json").write_text(
        json.dumps({"fpo-ds-tiny-tdpo1": {"arena_hard": 5.0}, "fpo-ds-tiny-fpo": {"arena_hard": 99.0}})
    )


def test_report_fills_measured_and_judged_cells_only(tmp_path):
    root = _planted(tmp_path)
    _plant_judges(root)
    compare.write(root)
    rows = json.loads((root / "report.json").read_text())["rows"]
    cells = {r: v["cells"] for r, v in rows.items()}
    assert cells["fpo"] == {
        "accuracy": pytest.approx(75.0),
        "dpo_reward_accuracy": pytest.approx(25.0),
        "feature_mse": [0.0125, 0.5],
        "alpaca_eval_lc": 12.25,
        "alpaca_eval_wr": 10.5,
        "arena_hard": pytest.approx(12.8),  # the tool's file wins over scores.json's 99
        "mt_bench": 6.5,
    }
    assert cells["simpo"]["dpo_reward_accuracy"] is None and cells["simpo"]["alpaca_eval_lc"] is None
    assert cells["simpo"]["alpaca_eval_wr"] == 9.0 and cells["simpo"]["feature_mse"] is None
    assert cells["tdpo2"]["arena_hard"] == 7.5 and cells["tdpo1"]["arena_hard"] == 5.0
    assert cells["sft"]["mt_bench"] == 4.0 and cells["sft"]["accuracy"] == pytest.approx(50.0)
    assert all(cells["dpo"][c] is None for c in compare.JUDGED)
    md = (root / "report.md").read_text()
    main_table = md.split("## Details")[0]
    table = {line.split(" | ")[0][2:]: line for line in main_table.splitlines() if line.startswith("| ")}
    assert table["FPO"] == "| FPO | 12.2 | 10.5 | 12.8 | 6.50 | 75.0 | 25.0 | 0.0125 / 0.5 |"
    assert table["SimPO"] == "| SimPO | – | 9.0 | – | – | 70.0 | – | – |"
    assert table["DPO"] == "| DPO | – | – | – | – | 55.0 | 25.0 | – |"
    assert list(table)[1:] == [
        "SFT", "DPO", "TDPO-1", "TDPO-2", "SimPO", "FPO",
    ]  # fmt: skip
    assert "5 answers, 4 chars, 1 cut" in md and "5 answers, 2 chars, 1 cut" in md  # AlpacaEval; MT-Bench 1+3 / 2
    assert "DPO: no AlpacaEval 2 answers" in md and md.count("no held-out") == 0


def test_report_says_what_did_not_finish(tmp_path):
    root = _planted(tmp_path)
    (Path(json.loads((root / "compare.json").read_text())["rows"]["tdpo1"]["run_dir"]) / "DONE.json").unlink()
    (root / "runs" / "simpo" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    assert cli.main(["compare-report", str(root)]) == 0
    report = json.loads((root / "report.json").read_text())
    assert f"TDPO-1: training did not finish ({root}/runs/tdpo1/DONE.json missing)" in report["missing"]
    assert f"SimPO: no held-out metrics in {root}/runs/simpo/metrics.jsonl" in report["missing"]
    assert report["rows"]["simpo"]["cells"]["accuracy"] is None
    assert "| SimPO | – | – | – | – | – | – | – |" in (root / "report.md").read_text()


def test_report_refuses_an_unknown_judge_column(tmp_path):
    root = _planted(tmp_path)
    (root / "judge" / "scores.json").write_text(json.dumps({"fpo-ds-tiny-fpo": {"alpacaeval": 3}}))
    with pytest.raises(ValueError, match="unknown column"):
        compare.write(root)


# ----------------------------------------------------------------------------- end to end on the test Slurm

# The test Slurm's node has 2 CPUs and no GPU: 2 ranks per training job, one per generate job. Jobs
# may share the CPUs (--oversubscribe; the test partition allows up to 4 jobs per CPU), so the
# independent ones run side by side as on a cluster, instead of one after another.
CPU_SLURM = {
    "SBATCH_EXTRA": "--gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 --oversubscribe",
    "SBATCH_GENERATE": "--ntasks-per-node=1",
}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def _state(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait(job: str, timeout: float) -> str:
    end = time.time() + timeout
    while time.time() < end:
        state = _state(job).get("JobState", "")
        if state in TERMINAL:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} not finished after {timeout}s: {_state(job)}")


def _logs(root: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-2500:]}" for p in sorted((root / "logs").glob("*.out")))


@pytest.mark.multiproc
def test_compare_sh_tiny_runs_every_stage_on_slurm_and_fills_the_table(tmp_path):
    """SFT -> export -> cache -> 5 methods -> export + answers for 3 benchmarks -> report, as Slurm jobs."""
    need_infra("slurm_up.sh")
    world = toy.write_world(tmp_path / "world", "gemma2", n_train=64, n_eval=8)  # the planner adds an SAE
    root, t0 = tmp_path / "cmp", time.time()
    cmd = ["bash", "slurm/compare.sh", "tiny", "--root", str(root), "--world", str(world), "--sft", *QUESTIONS]
    env = subprocess_env(PYTHON=sys.executable, **CPU_SLURM)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(line.split("\t")[:2] for line in (root / "jobs.tsv").read_text().splitlines())
    assert len(jobs) == 15  # sft, sft-export, cache, 5 x (train, generate), sft-generate, report
    assert _wait(jobs["report"], 600) == "COMPLETED", _logs(root)
    states = {name: _state(job).get("JobState") for name, job in jobs.items()}
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{_logs(root)}"
    for run in ["sft", *compare_plan.METHODS]:
        assert json.loads((root / "runs" / run / "DONE.json").read_text())["steps"] == 2
        assert (root / "models" / run / "config.json").is_file()
    assert (root / "cache" / "manifest.json").is_file() and (root / "cache" / "eval" / "manifest.json").is_file()
    report = json.loads((root / "report.json").read_text())
    assert report["missing"] == []
    for row, r in report["rows"].items():
        assert [a["answers"] for a in r["answers"].values()] == [5, 5, 5], row  # every question answered
        assert r["eval"]["step"] == 2 and 0 <= r["cells"]["accuracy"] <= 100, row
        assert (r["cells"]["dpo_reward_accuracy"] is None) == (row in ("sft", "simpo")), row
        assert (r["cells"]["feature_mse"] is not None) == (row == "fpo"), row
        assert all(r["cells"][c] is None for c in compare.JUDGED)  # nothing judged: nothing filled in
    md = (root / "report.md").read_text()
    assert all(f"| {label} | – | – | – | – | " in md for label in compare.LABELS.values())
    print(f"compare.sh tiny: {time.time() - t0:.0f} s from submission to report\n{md}")
