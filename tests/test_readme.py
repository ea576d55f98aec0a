"""README.md's commands stay true: every fenced bash block is parsed and each command checked cheaply.

For each command line: the files, scripts and recipes it names exist; recipes load with the
overrides given; `python -m X` / `torchrun ... -m X` / `deepspeed --module X` modules exist and
accept the arguments; `fpo-ds SUB` subcommands exist and accept their flags (parsed by the real
parser, stopped before the command runs); `make` targets exist. `fpo-ds validate` actually runs.
A program the test does not know fails it: add a check, or list the program in EXTERNAL.
"""

import argparse
import importlib
import importlib.util
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

from fpo_ds import cli
from fpo_ds import config as C

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Programs that are not this repository's: only their arguments that name repository files are checked.
EXTERNAL = {"source", "cd", "mkdir", "export", "scontrol", "sed", "squeue", "sinfo", "scancel", "pgrep", "ip", "cat"}
LAUNCHERS = {"torchrun", "deepspeed", "mpirun", "srun"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # RECIPE, SFT_DIR: stand for the reader's own values


def _commands() -> list[tuple[str, list[str]]]:
    """(source line, argv) for each simple command of each ```bash block (pipes and && split it)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and re.match(r"^\w+=\$\(", words[0]):  # x=$(cmd ...): check cmd
                words[0] = words[0].split("$(", 1)[1]
                words[-1] = words[-1].removesuffix(")")
            cmd: list[str] = []
            for w in [*words, "|"]:
                if w in ("|", "&&", ";", "||"):
                    while cmd and re.match(r"^\w+=", cmd[0]):  # VAR=value cmd
                        cmd.pop(0)
                    if cmd:
                        out.append((line.strip(), cmd))
                    cmd = []
                elif not w.startswith((">", "2>")):
                    cmd.append(w)
    return out


COMMANDS = _commands()


class Parsed(Exception):
    """Raised in place of running a command once argparse accepted its arguments."""


def _parse_only(fn, argv: list[str]) -> argparse.Namespace:
    """Run fn(argv) up to its argparse call; returns the parsed arguments, or fails with argparse's message."""
    calls = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_intermixed_args")}

    def stop(name):
        def parse(self, args=None, namespace=None):
            raise Parsed(calls[name](self, args, namespace))

        return parse

    patches = [mock.patch.object(argparse.ArgumentParser, n, stop(n)) for n in calls]
    for p in patches:
        p.start()
    try:
        fn(argv)
    except Parsed as parsed:
        return parsed.args[0]
    except SystemExit as e:
        pytest.fail(f"arguments {argv} rejected (exit {e.code}); see the usage above")
    finally:
        for p in patches:
            p.stop()
    pytest.fail(f"{argv}: the command ran without parsing arguments with argparse")


def _check_recipe(args: list[str], where: str) -> None:
    """The first argument is a recipe (or a placeholder); it loads with the key=value overrides that follow."""
    if not args or PLACEHOLDER.match(args[0]):
        return
    assert (ROOT / args[0]).is_file(), f"{where}: {args[0]} does not exist"
    C.load(str(ROOT / args[0]), [a for a in args[1:] if "=" in a and not a.startswith("-")])


def _check_module(module: str, args: list[str], where: str) -> None:
    assert importlib.util.find_spec(module), f"{where}: no module {module}"
    if module.startswith("fpo_ds."):
        mod = importlib.import_module(module)
        _parse_only(mod.main, args)
        if module in ("fpo_ds.train", "fpo_ds.cache_build"):
            _check_recipe(args, where)


def _after(words: list[str], flag: str) -> tuple[str, list[str]] | None:
    if flag in words:
        i = words.index(flag)
        return words[i + 1], words[i + 2 :]
    return None


def _check_launcher(words: list[str], where: str) -> None:
    """torchrun/deepspeed/mpirun/srun: the module or script they start."""
    for flag in ("-m", "--module"):
        hit = _after(words, flag)
        if hit:
            return _check_module(*hit, where)
    scripts = [w for w in words if w.endswith(".py")]
    assert scripts, f"{where}: no module (-m/--module) or script found"
    assert (ROOT / scripts[0]).is_file(), f"{where}: {scripts[0]} does not exist"


def _check_fpo_ds(args: list[str], where: str) -> None:
    if args[:1] == ["validate"]:  # cheap and offline: run it for real
        assert cli.main(args) == 0, f"{where}: fpo-ds validate failed"
        return
    _parse_only(cli.main, args)
    if args[:1] in (["train"], ["build-cache"]):
        _check_recipe(args[1:], where)
    if args[:1] == ["launch"]:  # torchrun's options, then the fpo-ds command
        at = next((i for i, a in enumerate(args) if a in ("train", "build-cache")), None)
        if at is not None:
            _check_recipe(args[at + 1 :], where)


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, re.M))


def _check(words: list[str], where: str) -> None:
    prog = words[0]
    if prog in ("fpo-ds", ".venv/bin/fpo-ds"):
        _check_fpo_ds(words[1:], where)
    elif prog in ("python", "python3", ".venv/bin/python"):
        hit = _after(words, "-m")
        if hit:
            _check_module(*hit, where)
        else:
            assert (ROOT / words[1]).is_file(), f"{where}: {words[1]} does not exist"
    elif prog in LAUNCHERS:
        _check_launcher(words, where)
    elif prog == "make":
        missing = {w for w in words[1:] if "=" not in w and not w.startswith("-")} - _make_targets()
        assert not missing, f"{where}: no make target {sorted(missing)} in the Makefile"
    elif prog in ("bash", "sbatch"):
        script = next(w for w in words[1:] if w.endswith(".sh"))
        assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
        if prog == "sbatch":
            _check_recipe(words[words.index(script) + 1 :], where)
    else:
        assert prog in EXTERNAL, f"{where}: tests/test_readme.py does not know `{prog}`: add a check or EXTERNAL"


def test_readme_has_commands():
    assert len(COMMANDS) > 10 and any(w[0] == "make" for _, w in COMMANDS)


@pytest.mark.parametrize("line,words", COMMANDS, ids=[" ".join(w)[:60] for _, w in COMMANDS])
def test_readme_command(line, words):
    _check(words, line)
