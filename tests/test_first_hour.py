"""What a new user meets in the first hour: op builds announced, progress with rates, errors that say what to pass.

Fast, single-process; the infrastructure checks need root and `ip` (as in CI) and skip elsewhere.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from fpo_ds import checkpoint, cli, dist, metrics

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- op builds


def test_extensions_dir_is_the_installations_unless_set(monkeypatch):
    assert dist.extensions_dir() == ROOT / ".torch_extensions"  # a writable checkout: the Makefile's directory
    env = {}
    assert dist.use_extensions_dir(env) == str(ROOT / ".torch_extensions") == env["TORCH_EXTENSIONS_DIR"]
    assert dist.use_extensions_dir({"TORCH_EXTENSIONS_DIR": "/mine"}) == "/mine"  # the user's choice wins
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # e.g. installed read-only for all users
    monkeypatch.setenv("XDG_CACHE_HOME", "/cache")
    other = dist.extensions_dir()
    assert other.parent == Path("/cache/fpo-ds") and other.name.startswith("torch_extensions-")


def test_op_build_is_announced_once_with_its_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with dist.announce_build("fake_op", "a test op", "~1 s"):
        (tmp_path / "fake_op").mkdir()
        (tmp_path / "fake_op" / "fake_op.so").write_bytes(b"")  # where torch's cpp_extension puts the build
    out = capsys.readouterr().out
    assert f"building a test op (fake_op) once, into {tmp_path} (~1 s; later runs reuse it)..." in out
    assert re.search(r"built fake_op in \d+ s", out)
    with dist.announce_build("fake_op", "a test op", "~1 s"):
        pass
    assert capsys.readouterr().out == ""  # built: nothing to say


# ----------------------------------------------------------------------------- progress


def test_progress_line_has_rate_and_eta():
    p = metrics.Progress("build-cache", 100, "pairs")
    p.t0 = 0.0
    assert p.line(0, now=1.0) == "build-cache: 0/100 pairs"
    assert p.line(25, now=10.0) == "build-cache: 25/100 pairs (2.5 pairs/s, eta 30s)"
    assert p.line(100, now=40.0, note="done") == "build-cache: 100/100 pairs (2.5 pairs/s, took 40s) done"
    q = metrics.Progress("eval", 4)
    q.t0 = 0.0
    assert q.line(2, now=4.0) == "eval: 2/4 (0.5/s, eta 4s)"


def test_progress_prints_first_then_at_most_every_period_and_last(capsys):
    p = metrics.Progress("x", 3, every_s=3600)
    for i in (1, 2, 3):
        p.update(i)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["x: 1/3", "x: 3/3"]


def _progress_line(tmp_path, method: str, capsys) -> str:
    cfg = SimpleNamespace(every=1, progress_bar=False, tensorboard=False, wandb=False)
    w = metrics.Writer(str(tmp_path / method), cfg, 10, {"loss": {"method": method}})
    m = {"loss": 1.5, "rewards/margins": 0.0, "rewards/accuracies": 0.0, "logps/chosen": -12.345, "lr": 1e-4}
    w.write(1, m | {"tokens_per_s": 100.0}, 0)
    w.close()
    return capsys.readouterr().err


def test_progress_shows_the_metrics_of_the_method(tmp_path, capsys):
    sft = _progress_line(tmp_path, "sft", capsys)
    assert "loss 1.5000 logps/chosen -12.35" in sft and "margin" not in sft and "acc" not in sft
    dpo = _progress_line(tmp_path, "dpo", capsys)
    assert "loss 1.5000 margin 0.0000 acc 0.00" in dpo and "logps" not in dpo


def test_eval_shows_progress_per_model(world, tmp_path, capsys):
    from fpo_ds.tools.demo import evaluate

    model = str(world / "model")
    data = str(world / "data" / "eval.jsonl")
    evaluate.compare_models({"other": model}, model, data, str(tmp_path), max_new_tokens=2, max_pairs=4)
    out = capsys.readouterr()
    assert f"eval: model 1/2 reference ({model})" in out.out and "eval: model 2/2 other" in out.out
    assert re.search(r"eval: 1/2 models \([\d.e+]+ models/s, eta \d+s\) \(reference: preference accuracy", out.err)
    assert re.search(r"eval: 2/2 models \([\d.e+]+ models/s, took \d+s\) \(other:", out.err)


# ----------------------------------------------------------------------------- export


def _run_dir(tmp_path: Path, complete: tuple[int, ...], partial: tuple[int, ...] = ()) -> Path:
    ckpts = tmp_path / "runs" / "x" / "checkpoints"
    for step in complete + partial:
        (ckpts / checkpoint.tag_of(step)).mkdir(parents=True)
    for step in complete:
        (ckpts / checkpoint.tag_of(step) / checkpoint.MARKER).write_text(json.dumps({"files": {}}))
    if complete:
        (ckpts / "latest").write_text(checkpoint.tag_of(complete[-1]))
    return ckpts.parent


def test_export_of_a_run_directory_names_the_step_directories(tmp_path, capsys):
    run = _run_dir(tmp_path, complete=(5, 10), partial=(15,))
    want = (
        f"pass a step directory such as {run / 'checkpoints' / 'step_00000010'} "
        "(complete checkpoints: step_00000005, step_00000010)"
    )
    for path in (run, run / "checkpoints"):
        with pytest.raises(FileNotFoundError, match=re.escape(want)):
            checkpoint.export(path, tmp_path / "out")
    assert cli.main(["export", str(run), str(tmp_path / "out")]) == 1
    assert want in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist; pass a checkpoint step directory"):
        checkpoint.export(tmp_path / "nope", tmp_path / "out")
    empty = _run_dir(tmp_path / "e", complete=(), partial=(3,))
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        checkpoint.export(empty, tmp_path / "out")


def test_exported_generation_config_stops_at_the_end_of_turn(tokenizer):
    from transformers import GenerationConfig

    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert checkpoint.end_of_turn_ids(tokenizer) == [end]
    gen = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    checkpoint.stop_at_end_of_turn(gen, tokenizer)
    assert gen.eos_token_id == [tokenizer.eos_token_id, end]
    checkpoint.stop_at_end_of_turn(gen, tokenizer)
    assert gen.eos_token_id == [tokenizer.eos_token_id, end]  # idempotent


def test_no_chat_template_no_extra_stop(tokenizer):
    from transformers import GenerationConfig

    plain = SimpleNamespace(chat_template=None)
    assert checkpoint.end_of_turn_ids(plain) == []
    gen = GenerationConfig(eos_token_id=2)
    checkpoint.stop_at_end_of_turn(gen, plain)
    assert gen.eos_token_id == 2


# ----------------------------------------------------------------------------- bench scripts


def _calibrate():
    spec = importlib.util.spec_from_file_location("calibrate_plan", ROOT / "bench" / "calibrate_plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "does not exist"),
        ("{oops", r"is not valid JSON \(line 1"),
        ('{"config": {"hidden": 1}}', r"is not a bench result \(no config keys \['layers'"),
        ("[1]", "is not a bench result"),
    ],
)
def test_calibrate_plan_names_a_bad_input_file(tmp_path, content, match):
    path = tmp_path / "bench.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=f"calibrate_plan: {re.escape(str(path))} {match}.*bench/gpu.sh"):
        _calibrate().read_bench(str(path))


def test_bench_results_in_the_repository_are_readable():
    mod = _calibrate()
    paths = list((ROOT / "bench" / "results").glob("*-bench*.json"))  # `fpo-ds bench` results (not startup.py's)
    assert paths and all(mod.read_bench(str(path))["methods"] for path in paths)


# ----------------------------------------------------------------------------- slurm logs, report figure


def test_slurm_logs_go_to_a_directory_that_exists_and_is_ignored():
    for script in (ROOT / "slurm").glob("*.sh"):
        for out in re.findall(r"^#SBATCH --output=(\S+)", script.read_text(), re.M):
            assert out.startswith("runs/slurm/"), f"{script.name}: --output={out}"
            assert (ROOT / out).parent.is_dir(), f"{script.name}: Slurm does not create {Path(out).parent}"
    if not (shutil.which("git") and (ROOT / ".git").exists()):
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert not ignored("runs/slurm/.gitkeep")  # shipped, so the directory exists in a fresh clone
    assert ignored("runs/slurm/fpo-ds-train-12.out") and ignored("slurm-12.out") and ignored("runs/demo/report.md")


def test_curves_have_labelled_axes_and_say_they_are_means_over_seeds(tmp_path):
    from fpo_ds.tools.demo import report

    for seed in (1, 2):
        run = tmp_path / "runs" / f"dpo-s{seed}"
        run.mkdir(parents=True)
        rows = [{"step": s, "loss": 0.7 - 0.1 * s * seed, "rewards/margins": 0.1 * s} for s in (1, 2, 3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = report.curves_figure(tmp_path, ("dpo",), 2)
    assert "mean over 2 data-order seeds" in fig._suptitle.get_text()
    for ax in fig.axes:
        assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel()
    assert fig.axes[0].lines[0].get_ydata().tolist() == pytest.approx([0.55, 0.4, 0.25])  # the mean of 2 seeds


# ----------------------------------------------------------------------------- test infrastructure

needs_root_ip = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip"), reason="tests/infra needs root and iproute2 (as in CI)"
)


@needs_root_ip
def test_infra_down_undoes_only_what_was_recorded(tmp_path):
    ns = f"fpo-fh-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    mine, other = (subprocess.Popen(["sleep", "300"]) for _ in range(2))
    made = tmp_path / "made.conf"
    made.write_text("x")
    state = tmp_path / "started"
    state.write_text(f"file {made}\nnetns {ns}\npid sleep {mine.pid}\npid sleep 999999999\n")
    try:
        proc = subprocess.run(["bash", str(ROOT / "tests/infra/down.sh"), str(state)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert mine.wait(timeout=10) is not None and other.poll() is None  # only the recorded process
        assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not made.exists() and not state.exists()
    finally:
        other.kill()
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def test_slurm_up_refuses_a_slurm_conf_it_did_not_write(tmp_path):  # checked first: needs neither root nor Slurm
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=production\nSlurmctldHost=head\n")
    env = dict(os.environ, SLURM_CONF=str(conf), FPO_DS_INFRA_STATE=str(tmp_path / "started"))
    proc = subprocess.run(
        ["bash", str(ROOT / "tests/infra/slurm_up.sh"), str(tmp_path / "state")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3 and f"refusing to touch {conf}" in proc.stderr
    assert conf.read_text() == "ClusterName=production\nSlurmctldHost=head\n" and not (tmp_path / "started").exists()


def test_infra_scripts_parse():
    scripts = sorted((ROOT / "tests" / "infra").glob("*.sh"))
    assert len(scripts) >= 2, scripts  # the emulated cluster's scripts are there to check
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
