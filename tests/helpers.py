"""Shared by the subprocess-launching tests."""

from pathlib import Path

from infra_state import need_infra  # noqa: F401 - the tests import it from here

from fpo_ds.pipeline import child_env

ROOT = Path(__file__).resolve().parent.parent


def subprocess_env(**extra: str) -> dict:
    """The launcher's child environment plus the test settings: CPU accelerator, offline hub, private op cache."""
    env = child_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.update(extra)
    return env


def write_recipe(tmp: Path, world: Path, name: str, defaults: dict | None = None, **sections: dict) -> str:
    """A recipe file for the multi-process tests: the toy world's model and data, ZeRO-3 fp32, 3 short steps.

    `defaults` (a test module's own) and then `sections` update the base section by section.
    """
    import yaml

    raw = {
        "model": {"name_or_path": str(world / "model")},
        "data": {"path": str(world / "data" / "train.jsonl"), "max_length": 48, "max_prompt_length": 24},
        "train": {"global_batch_size": 4, "micro_batch_size": 1, "lr": 1e-3, "warmup_steps": 1, "max_steps": 3},
        "deepspeed": {"config": str(ROOT / "ds_configs" / "zero3_fp32.json"), "timeout_minutes": 3},
        "logging": {"progress_bar": False},
        "output": {"dir": str(tmp / "runs" / name)},
    }
    for layer in (defaults or {}, sections):
        for key, value in layer.items():
            raw[key] = {**raw.get(key, {}), **value}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def launch_on_hosts(
    entry: list[str], hosts: int, per_host: int, port: int, master: str, timeout: float
) -> tuple[list, list[str]]:
    """Run `torchrun ENTRY` on each namespace host (tests/infra/on_host.sh); (processes, their logs) once all end."""
    import subprocess

    from fpo_ds import pipeline

    procs = []
    for host in range(1, hosts + 1):
        cmd = pipeline.torchrun_cmd(per_host, port, nodes=hosts, node_rank=host - 1, master=master)
        procs.append(
            subprocess.Popen(
                [str(ROOT / "tests" / "infra" / "on_host.sh"), str(host), *cmd, *entry],
                cwd=ROOT,
                env=subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs, [p.communicate(timeout=timeout)[0] for p in procs]
