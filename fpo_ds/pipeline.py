"""Several stages in one distributed launch (saves the launcher start-up per stage).

    torchrun --nproc_per_node 2 -m fpo_ds.pipeline PLAN.json

PLAN.json is a list of {"stage": "train" | "build-cache", "recipe": PATH, "overrides": [...]}.
Each stage runs through the same code as `fpo-ds train` / `fpo-ds build-cache`; a stage whose
output is already complete (DONE.json / manifest.json) is skipped, so re-running resumes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

if importlib.util.find_spec("sae_lens"):  # sae-lens must be imported before any zero.Init
    import sae_lens  # noqa: F401

from fpo_ds import cache, dist, train  # noqa: E402
from fpo_ds import config as C  # noqa: E402


def stage_done(stage: dict) -> bool:
    recipe = C.load(stage["recipe"], stage.get("overrides", []))
    if stage["stage"] == "build-cache":
        return (Path(recipe.cache.dir) / "manifest.json").is_file()
    return (Path(recipe.output.dir) / train.DONE).is_file()


def launch(stages: list[dict], plan_path: Path, nproc: int, quiet: bool = False) -> bool:
    """Run the incomplete stages in one torchrun launch of this module; False if all were complete."""
    import os
    import subprocess

    stages = [s for s in stages if not stage_done(s)]
    if not stages:
        return False
    plan_path.write_text(json.dumps(stages, indent=1))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(plan_path.parent / ".torch_extensions"))
    port = str(29300 + os.getpid() % 500)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        port,
        "-m",
        "fpo_ds.pipeline",
        str(plan_path),
    ]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL if quiet else None)
    return True


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    plan = json.loads(Path(argv[0]).read_text())
    code = 0
    for i, stage in enumerate(plan):
        if stage_done(stage):
            dist.log(f"pipeline: stage {i + 1}/{len(plan)} {stage['stage']} {stage['recipe']}: complete, skipped")
            continue
        dist.log(f"pipeline: stage {i + 1}/{len(plan)} {stage['stage']} {stage['recipe']} {stage.get('overrides', [])}")
        recipe = C.load(stage["recipe"], stage.get("overrides", []))
        if stage["stage"] == "build-cache":
            cache.build(recipe)
        elif train.run(recipe).preempted:
            code = train.Preemption.EXIT_REQUEUE
            break
    dist.shutdown(code)


if __name__ == "__main__":
    main()
