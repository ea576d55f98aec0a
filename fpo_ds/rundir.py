"""A run directory has one writer, and a new run never destroys an old one.

- `claim(path, key)`: rank 0 takes an exclusive lock (POSIX `lockf`, which shared filesystems
  honour) on `<real path>.lock`, beside the directory, for the whole run. The lock is keyed by the
  directory's resolved real path, so a second name for it (a symlink, `..`) meets the same lock.
  A second job on the same directory gets one paragraph naming the holder (host, pid, Slurm job)
  and changes nothing. The kernel drops the lock when its process dies, so a stale lock file is
  taken over, with a note; a holder that ended normally cleared its record, so no note follows.
- `prepare(output_cfg)`: `output.resume=never` in a directory that holds a run is refused unless
  `output.overwrite=true`, which moves the old run aside (`<dir>.replaced-<time>`), never deletes it.
- `repair_metrics(path, step)`: a torn last line (a crash mid-write) is dropped on resume, with a note.
- `versions()`: what produced a run (library versions, git commit), for run_info.json, DONE.json and model cards.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from fpo_ds import dist

_HELD: list = []  # open lock files: the lock lives as long as the file stays open (the whole process)


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:300],
    }


class Lock:
    """A held run lock; `release()` (or process exit) frees it."""

    def __init__(self, f):
        self.f = f

    def release(self) -> None:
        """Clear the holder record (the next run takes over silently), then unlock."""
        if self.f in _HELD:
            _HELD.remove(self.f)
        if not self.f.closed:
            with contextlib.suppress(OSError):
                self.f.seek(0)
                self.f.truncate()
                self.f.flush()
            self.f.close()


def claim(path: str | Path, key: str) -> Lock:
    """Take the run lock of directory `path` (config key `key` names it in errors). Rank 0 only.

    The lock file sits beside the directory's real path: every name of one directory shares one lock.
    """
    given = Path(path)
    path = Path(os.path.realpath(given))
    lock = path.with_name(path.name + ".lock")
    shown = str(given) if path == given.absolute() else f"{given} (real path {path})"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+")
    except OSError as e:
        raise OSError(f"{key}: cannot create {lock} ({e.strerror}); pick a writable {key}") from None
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        held = f.read().strip() or "{}"
        f.close()
        who = json.loads(held) if held.startswith("{") else {}
        job = f", Slurm job {who['slurm_job']}" if who.get("slurm_job") else ""
        raise OSError(
            f"{key}: {shown} is in use by another run (host {who.get('host', '?')}, pid {who.get('pid', '?')}{job}, "
            f"since {who.get('since', '?')}: {who.get('command', '')}). Two jobs writing one directory corrupt each "
            f"other; nothing was changed. Wait for it, stop it, or pick another {key}"
        ) from None
    f.seek(0)
    previous = f.read().strip()
    if previous:
        dist.log(f"{key}: took over the lock of {shown} from a process that is gone ({previous[:200]})")
    f.seek(0)
    f.truncate()
    f.write(json.dumps(_holder()))
    f.flush()
    _HELD.append(f)
    return Lock(f)


@contextlib.contextmanager
def exclusive(claim_on_rank0):
    """Collective: hold what `claim_on_rank0()` (run on rank 0, returning a Lock) claims until the block ends.

    A user error in it is printed once, by rank 0; the other ranks exit quietly (dist.on_rank0).
    """
    before = list(_HELD)
    try:
        lock = dist.on_rank0(claim_on_rank0)
    except BaseException:  # refused after the lock was taken (e.g. resume=never over a run): free it, cleared
        for f in [f for f in _HELD if f not in before]:
            Lock(f).release()
        raise
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def holds_run(out_dir: Path) -> bool:
    """A directory with checkpoints or step metrics holds a run."""
    return (out_dir / "checkpoints").is_dir() or (out_dir / "metrics.jsonl").is_file()


def prepare(output_cfg) -> None:
    """Rank 0, under the lock: make output.dir ready for a run without destroying another one."""
    out = Path(output_cfg.dir)
    if out.exists() and not out.is_dir():
        raise OSError(f"output.dir: {out} is a file, not a directory; pick another output.dir")
    if output_cfg.resume == "never" and holds_run(out):
        if not output_cfg.overwrite:
            raise ValueError(
                f"output.dir: {out} holds a run (checkpoints or metrics.jsonl) and output.resume=never would start "
                "another one on top of it. Use output.resume=auto to continue it, another output.dir, or "
                "output.overwrite=true to move the old run aside (it is renamed, not deleted)"
            )
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(out, aside)
        dist.log(f"output.overwrite: moved the previous run in {out} aside to {aside}")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output.dir: cannot write in {out} ({e.strerror}); pick a writable output.dir") from None


def repair_metrics(path: Path, last_step: int) -> None:
    """Keep the records up to `last_step` (a resume logs later steps again); drop a torn line, with a note."""
    if not path.is_file():
        return
    keep, torn = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1  # a crash mid-write leaves a partial last line
            continue
        if record.get("step", 0) <= last_step:
            keep.append(line)
    if torn:
        dist.log(f"{path}: dropped {torn} torn line(s) left by an interrupted write")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def versions() -> dict:
    """What produced a run: library versions and the git commit of this checkout (if any)."""
    import subprocess

    import deepspeed
    import torch
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    from importlib.metadata import PackageNotFoundError, version

    try:
        sae_lens = version("sae-lens")  # read from metadata: importing sae_lens costs seconds
    except PackageNotFoundError:
        sae_lens = None
    return {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "sae_lens": sae_lens,
        "git_commit": commit or None,
    }
