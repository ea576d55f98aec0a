"""Launching from Python: torchrun on this machine, and several stages in one distributed launch.

    torchrun --nproc_per_node 2 -m fpo_ds.pipeline PLAN.json

PLAN.json is a list of {"stage": "train" | "build-cache", "recipe": PATH, "overrides": [...]}.
Each stage runs through the same code as `fpo-ds train` / `fpo-ds build-cache`; a stage whose
output is already complete (DONE.json / manifest.json) is skipped, so re-running resumes.
One launch saves the start-up (imports, process group, op load) of every stage after the first.
`torchrun()` is the one place a torchrun command line is built (the demo, the bench and the
tests launch through it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fpo_ds import cache_build, components, dist, train
from fpo_ds import config as C

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(base: dict | None = None, **extra: str) -> dict:
    """Environment for launched ranks: one thread per rank unless set, no rank variables inherited."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in RANK_VARS:
        env.pop(key, None)
    env.update(extra)
    return env


def torchrun_cmd(nproc: int, port: int, nodes: int = 1, node_rank: int = 0, master: str | None = None) -> list[str]:
    """The command line that starts `nproc` ranks on this host (append a script or -m module and its args).

    With nodes > 1 it is this host's part of a static multi-node launch: run it on every host
    with its node_rank and the first host's address as `master`.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]
    if nodes > 1:
        cmd += ["--nnodes", str(nodes), "--node_rank", str(node_rank), "--master_addr", master or "127.0.0.1"]
    return cmd


def torchrun(
    entry: list[str],
    nproc: int,
    *,
    port: int | None = None,
    env: dict | None = None,
    cwd: str | Path | None = None,
    capture: bool = False,
    quiet: bool = False,
    timeout: float | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `entry` (e.g. ["-m", "fpo_ds.train", RECIPE]) on `nproc` local ranks under torchrun.

    `capture` keeps stdout and stderr in the result; `quiet` drops stdout (progress and errors,
    on stderr, still show). A failure raises CalledProcessError with the output's tail.
    """
    cmd = torchrun_cmd(nproc, port or 29300 + os.getpid() % 500)
    out = subprocess.PIPE if capture else subprocess.DEVNULL if quiet else None
    err = subprocess.PIPE if capture else None
    env = child_env() if env is None else env
    proc = subprocess.run(cmd + entry, env=env, cwd=cwd, stdout=out, stderr=err, text=True, timeout=timeout)
    if check and proc.returncode:
        tail = ((proc.stdout or "") + (proc.stderr or ""))[-6000:]
        raise subprocess.CalledProcessError(proc.returncode, cmd + entry, tail)
    return proc


def stage_done(stage: dict) -> bool:
    recipe = C.load(stage["recipe"], stage.get("overrides", []))
    if stage["stage"] == "build-cache":
        return (Path(recipe.cache.dir) / "manifest.json").is_file()
    return (Path(recipe.output.dir) / train.DONE).is_file()


def launch(stages: list[dict], plan_path: Path, nproc: int, quiet: bool = False) -> bool:
    """Run the incomplete stages in one torchrun launch of this module; False if all were complete."""
    stages = [s for s in stages if not stage_done(s)]
    if not stages:
        return False
    plan_path.write_text(json.dumps(stages, indent=1))
    env = child_env()
    dist.use_extensions_dir(env)  # the installation's op cache, unless TORCH_EXTENSIONS_DIR is set
    torchrun(["-m", "fpo_ds.pipeline", str(plan_path)], nproc, env=env, quiet=quiet)
    return True


def needs_sae(stage: dict) -> bool:
    role = "cache" if stage["stage"] == "build-cache" else "train"
    return components.wants_features(C.load(stage["recipe"], stage.get("overrides", [])), role)


def run_stage(stage: dict):
    """One stage in this process: the Path of a built cache, or train.Result."""
    recipe = C.load(stage["recipe"], stage.get("overrides", []))
    if stage["stage"] == "build-cache":
        return cache_build.build(recipe)
    return train.run(recipe)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    plan = json.loads(Path(argv[0]).read_text())
    if any(needs_sae(s) for s in plan):
        components.import_sae_lens()  # before the first stage's zero.Init
    code = 0
    for i, stage in enumerate(plan):
        what = f"pipeline: stage {i + 1}/{len(plan)} {stage['stage']} {stage['recipe']}"
        if stage_done(stage):
            dist.log(f"{what}: complete, skipped")
            continue
        dist.log(f"{what} {stage.get('overrides', [])}")
        result = run_stage(stage)
        if isinstance(result, train.Result) and result.preempted:
            code = result.exit_code
            break
    dist.shutdown(code)


if __name__ == "__main__":
    main()
