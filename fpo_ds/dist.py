"""Rank discovery (one place for every launcher), rank-0 printing, and failure reporting.

Sources, first match wins; variables already in the environment always win over discovery:
  1. torchrun / torch elastic / the `deepspeed` launcher: RANK, WORLD_SIZE, LOCAL_RANK set.
  2. srun (one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR is the
     first host of `scontrol show hostnames $SLURM_JOB_NODELIST`, MASTER_PORT from the job id.
     Read per task at run time, never expanded once in the batch shell.
  3. mpirun (Open MPI / MPICH via mpi4py): rank and size from MPI; rank 0's address is
     broadcast over MPI.
  4. none: a single process.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

EXTENSIONS_VAR = "TORCH_EXTENSIONS_DIR"
CPU_ADAM_OP = "cpu_adam"  # DeepSpeed's CPU Adam, built at the first run that offloads the optimizer
CPU_ADAM_BUILD = "~1-3 min on 2 CPU cores"  # measured cold: 73 s idle, 175 s with the cores busy


LAUNCHER_PID_VAR = "FPO_DS_LAUNCHER_PID"  # set by `fpo-ds launch`: the process its ranks must not outlive
FAILED_KEY = "fpo_ds/failed"  # in the process group's store: "<rank> <exit code>" of the first rank to fail
TOLD_KEY = "fpo_ds/told"  # set once that rank has printed its message
_REPORTING = False  # this rank is reporting a failure: stop signals wait until it is told


class Topology(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str


def _slurm_master() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0]  # a single plain hostname needs no expansion


def _port_from_job(job_id: str) -> int:
    # Deterministic per job (all tasks agree) and spread over 20000 ports to avoid clashes
    # between jobs sharing a node.
    return 20000 + int(job_id) % 20000 if job_id.isdigit() else 29500


def _own_address() -> str:
    """This host's address as the other hosts resolve its name."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _free_port() -> int:
    """A TCP port nobody listens on now (a launcher-less run has no peers to agree on one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover(env: dict | None = None) -> Topology:
    """Resolve the topology without side effects (env defaults to os.environ)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        source = "torchrun/deepspeed"
        rank, local = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500"))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        source = "slurm"
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_STEP_TASKS_PER_NODE", "1")).split("(")[0])
        addr = env.get("MASTER_ADDR") or _slurm_master()
        port = int(env.get("MASTER_PORT") or _port_from_job(env.get("SLURM_JOB_ID", "")))
    elif "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env or "PMIX_RANK" in env:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        source = "mpi"
        rank, world = comm.Get_rank(), comm.Get_size()
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", "0")))
        local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env.get("MPI_LOCALNRANKS", "1")))
        addr = env.get("MASTER_ADDR") or comm.bcast(_own_address() if rank == 0 else None, root=0)
        port = int(env.get("MASTER_PORT") or 29500)
    else:
        source = "single process"
        rank, world, local, local_world = 0, 1, 0, 1
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else _free_port()  # no peer needs to agree
    return Topology(rank, world, local, local_world, addr, port, source)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """Ranks on this node (the launcher's LOCAL_WORLD_SIZE; the world when it sets none)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


class Group(NamedTuple):
    """A block of consecutive ranks that shares work (the SAE encoder's shard group)."""

    ranks: tuple[int, ...]
    rank: int  # this rank's position in `ranks`
    handle: object | None  # torch process group; None means the default (whole-world) group

    @property
    def size(self) -> int:
        return len(self.ranks)


def group_size(spec: str | int, world: int, local_world: int) -> int:
    """`sae.shard_group` -> ranks per group: node = the launcher's ranks per node, world, none = 1, or G."""
    size = {"node": local_world, "world": world, "none": 1}.get(spec, spec) if isinstance(spec, str) else spec
    if not isinstance(size, int) or size < 1 or world % size:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(
            f"sae.shard_group: {spec!r} gives groups of {size} ranks, which do not divide the world of {world} "
            f"ranks; use node, world, none or one of {divisors}"
        )
    return size


def block_groups(spec: str | int) -> Group:
    """Collective: split the world into consecutive blocks per `spec` and return this rank's block.

    Every rank creates every block's process group, in the same order, as torch requires. With
    `node`, every block must sit on one host: a launcher that places ranks cyclically over hosts
    (or hosts with different rank counts) is refused rather than silently crossing the network.
    """
    import torch.distributed as tdist

    me, world, local_world = rank(), world_size(), local_world_size()
    size = group_size(spec, world, local_world)
    first = me - me % size
    ranks = tuple(range(first, first + size))
    if spec == "node" and world > 1:
        hosts: list = [None] * world
        tdist.all_gather_object(hosts, (socket.gethostname(), local_world))
        for g in range(0, world, size):
            block = {hosts[r] for r in range(g, g + size)}
            if len(block) > 1:
                raise ValueError(
                    f"sae.shard_group: node asked for groups of {size} ranks (the launcher's ranks per node), but "
                    f"ranks {g}-{g + size - 1} sit on {sorted(h for h, _ in block)} with "
                    f"{sorted({n for _, n in block})} ranks per node. Place ranks in blocks by host (e.g. srun "
                    "--distribution=block, the default) with the same count per host, or set sae.shard_group to "
                    "world, none or an integer"
                )
    if size in (1, world):
        return Group(ranks, me - first, None)
    handles = {g: tdist.new_group(list(range(g, g + size))) for g in range(0, world, size)}
    return Group(ranks, me - first, handles[first])


def log(*msg: object) -> None:
    """Print on rank 0 only (the one place the package prints)."""
    if rank() == 0:
        write_line(sys.stdout, " ".join(map(str, msg)))


def log_all(*msg: object) -> None:
    """Print on every rank, prefixed with host and rank (for errors that concern one rank)."""
    write_line(sys.stderr, " ".join([f"[{socket.gethostname()} rank {rank()}]", *map(str, msg)]))


def write_line(stream, text: str) -> None:
    """One write per line, newline included.

    `print` writes the text and the newline apart; with unbuffered output (PYTHONUNBUFFERED, as under
    Slurm) another rank's line could land between the two, joining two ranks' lines.
    """
    stream.write(text + "\n")
    stream.flush()


# Raised by fpo-ds for bad input (recipe, data, cache, checkpoint): their message is the whole
# story, so no traceback is printed unless FPO_DS_TRACEBACK=1.
USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)


class PeerFailed(RuntimeError):
    """Raised on the other ranks when rank 0 hit a user error: rank 0 alone prints the paragraph."""


def on_rank0(fn):
    """Collective: run `fn()` on rank 0 only and return its result there (None elsewhere).

    A user error in `fn` is raised on rank 0, and every other rank raises PeerFailed, which exits
    quietly with the same code: one paragraph per mistake, not one per rank.
    """
    import torch.distributed as tdist

    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except USER_ERRORS as e:
            error = e
    if tdist.is_initialized() and world_size() > 1:
        flag = [error is not None]
        tdist.broadcast_object_list(flag, src=0)
        if flag[0] and rank() != 0:
            raise PeerFailed("rank 0 reported the error")
    if error is not None:
        raise error
    return result


def from_rank0(obj):
    """Collective: rank 0's `obj`, on every rank (as it is where torch.distributed is not up)."""
    import torch.distributed as tdist

    box = [obj]
    if tdist.is_initialized() and world_size() > 1:
        tdist.broadcast_object_list(box, src=0)
    return box[0]


def launcher_rank() -> int:
    """This process's rank as its launcher announced it (before torch.distributed is up)."""
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def report_failures() -> None:
    """Entry points call this first: a failure prints one paragraph naming the rank, not a traceback."""
    sys.excepthook = _report_failure


def _exit(code: int) -> None:
    """Leave now, output flushed; no interpreter teardown (a gloo thread can abort it, see shutdown)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _met() -> bool:
    """Whether torch.distributed is up with peers (the ranks have met)."""
    tdist = sys.modules.get("torch.distributed")
    return tdist is not None and tdist.is_available() and tdist.is_initialized() and world_size() > 1


def first_to_fail(code: int) -> tuple[bool, int]:
    """Fail together: record this rank's failure in the process group's store.

    Returns whether this rank is the first of the job to fail (it alone speaks) and the exit code
    of that first failure (every rank exits with it). A failing rank records itself before it
    exits, and its peers only notice it (a closed connection) after that, so a peer always finds
    the record. When the store is gone, so is the rank that hosted it, after recording its own
    failure: this rank stays quiet. Ranks other than 0 wait half a second first, so a mistake seen
    by every rank at once is told by rank 0.
    """
    if not _met():
        return True, code
    mine = f"{rank()} {code}"
    try:
        store = _store()
        if rank() != 0:
            time.sleep(0.5)
        got = store.compare_set(FAILED_KEY, "", mine)
    except Exception:  # noqa: BLE001 - the store left with its host
        return False, code
    got = got.decode() if isinstance(got, bytes) else str(got)
    first = got == mine
    return first, code if first else int(got.split()[-1])


def _store():
    """The process group's key-value store (the launcher's, or the one rank 0 hosts), with a short timeout."""
    import torch.distributed as tdist

    store = tdist.distributed_c10d._get_default_store()
    store.set_timeout(datetime.timedelta(seconds=10))
    return store


def _told() -> None:
    """The first failing rank has printed its message: the quiet ranks may exit now."""
    with contextlib.suppress(Exception):
        _store().set(TOLD_KEY, "1")


def _await_told() -> None:
    """A quiet rank waits (a few seconds at most) until the first failing rank has printed its message.

    Otherwise its exit makes the launcher (torchrun) stop that rank before it has said anything.
    """
    if _met():
        with contextlib.suppress(Exception):
            _store().wait([TOLD_KEY], datetime.timedelta(seconds=5))


def _lost_peer(exc: BaseException) -> bool:
    """A collective failed because another rank went away (gloo/NCCL), not because of this rank."""
    text = f"{type(exc).__name__}: {exc}"
    signs = ("Connection closed by peer", "Connection reset by peer", "DistBackendError", "NCCL", "gloo", "Broken pipe")
    return any(s in text for s in signs)


def stop_now(code: int, message: str) -> None:
    """Exit at once with `code`: this rank says `message` unless another rank failed first (then it is quiet).

    Does nothing while this rank reports a failure (a launcher stopping the job must not cut that short).
    """
    if _REPORTING:
        return
    first, code = first_to_fail(code)
    if first:
        os.write(2, f"[{socket.gethostname()} rank {rank()}] {message}\n".encode())  # safe inside a signal handler
    os._exit(code)


def _report_failure(exc_type, exc, tb) -> None:
    global _REPORTING
    _REPORTING = True
    # torch.distributed wraps this hook to prefix "[rankN]: " to what it writes into a buffer, printed
    # after the hook returns; this hook exits instead (see _exit), and says its rank itself.
    sys.stderr = sys.__stderr__ or sys.stderr
    if issubclass(exc_type, PeerFailed):
        _await_told()
        _exit(1)  # rank 0 printed the paragraph
    met = _met()
    if issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C outside training (set-up, build-cache, generate)
        if (first_to_fail(130)[0] if met else launcher_rank() == 0) and os.environ.get("FPO_DS_TRACEBACK") != "1":
            log_all("interrupted (Ctrl-C); exiting (130)")
        _exit(130)
    if issubclass(exc_type, USER_ERRORS) and not met and launcher_rank() != 0:
        sys.exit(1)  # a mistake found before the ranks met (e.g. the recipe) is the same on every rank: rank 0 says it
    first, code = first_to_fail(1)
    if not first:
        _await_told()
        _exit(code)  # another rank failed first and said why; this rank's error is its echo
    if met and _lost_peer(exc):
        line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc_type.__name__
        log_all(
            "FAILED: another rank stopped without a word (killed, or out of memory?); the launcher's log names it. "
            f"Here: {line}"
        )
    else:
        log_all(f"FAILED: {exc_type.__name__}: {exc}")
        if not issubclass(exc_type, USER_ERRORS) or os.environ.get("FPO_DS_TRACEBACK") == "1":
            traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
    if met:
        _told()
        _exit(code)


def extensions_dir() -> Path:
    """Where this installation keeps the ops DeepSpeed JIT-compiles (its CPU comm op, CPU Adam).

    A checkout keeps them in `<repo>/.torch_extensions` (the directory the Makefile uses); an
    installation that cannot write there uses a user cache directory keyed by the install path
    and the Python environment. Either way one installation builds each op once: torch's default
    (one directory per user) is rebuilt whenever another installation's build touches it.
    """
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and os.access(repo, os.W_OK):
        return repo / ".torch_extensions"
    key = hashlib.sha256(f"{repo}\0{sys.prefix}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fpo-ds" / f"torch_extensions-{key}"


def use_extensions_dir(env: dict | None = None) -> str:
    """Set TORCH_EXTENSIONS_DIR to `extensions_dir()` unless the user set it; returns the one in use."""
    env = os.environ if env is None else env
    env.setdefault(EXTENSIONS_VAR, str(extensions_dir()))
    return env[EXTENSIONS_VAR]


def op_built(name: str, ext_dir: str | Path) -> bool:
    """Whether DeepSpeed op `name` is ready without a compile: installed pre-built, or JIT-built in `ext_dir`.

    torch.utils.cpp_extension builds op `name` in `<TORCH_EXTENSIONS_DIR>/<name>/` into `<name>.so`.
    """
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get(name)) or (Path(ext_dir) / name / f"{name}.so").is_file()


@contextlib.contextmanager
def announce_build(name: str, what: str, estimate: str):
    """Around code that may JIT-compile DeepSpeed op `name`: one line before a build, one after with its time.

    Prints nothing when the op is already built. `estimate` says how long it takes, e.g. "~40 s on 2 cores".
    """
    ext_dir = use_extensions_dir()
    building = not op_built(name, ext_dir)
    if building:
        log(f"building {what} ({name}) once, into {ext_dir} ({estimate}; later runs reuse it)...")
    t0 = time.perf_counter()
    yield
    if building and op_built(name, ext_dir):
        log(f"built {name} in {time.perf_counter() - t0:.0f} s")


def skip_shm_comm() -> None:
    """Keep DeepSpeed from building and mapping its CPU shared-memory all-reduce (CPU accelerator).

    DeepSpeed's torch backend JIT-compiles that op at the first CPU launch (38 s on 2 idle cores,
    up to 258 s on busy ones) and maps a 66 MiB buffer per rank in /dev/shm, which it never
    unlinks; yet only its tensor-parallel inference all-reduce (`inference_all_reduce`) uses it.
    Training's collectives go through torch.distributed (gloo) either way, so the op is marked
    unavailable before `init_distributed` looks for it.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by the scheduler (SIGTERM, SIGUSR1); run the same command again


def stop_on_signals() -> None:
    """SIGTERM / SIGUSR1 (preemption, Slurm's warning) once the ranks have met: one line, then exit 75 at once.

    Before the rendezvous the signals keep their default effect. Training replaces these handlers
    with its own (finish the step, save; fpo_ds.train.Preemption); build-cache and generate keep
    nothing partial that a rerun would trust, so they stop at once.
    """
    import signal

    def stop(signum, frame):
        name = signal.Signals(signum).name
        stop_now(EXIT_STOPPED, f"{name}: stopped before the end; exiting ({EXIT_STOPPED}). Run the same command again")

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, stop)


def init(timeout_minutes: int) -> Topology:
    """Discover the topology, export it, start torch.distributed through DeepSpeed (with a timeout)."""
    import deepspeed
    import torch.distributed as tdist

    report_failures()  # every rank names itself when it dies
    use_extensions_dir()  # before DeepSpeed builds anything
    topo = discover()
    os.environ.update(
        RANK=str(topo.rank),
        WORLD_SIZE=str(topo.world_size),
        LOCAL_RANK=str(topo.local_rank),
        LOCAL_WORLD_SIZE=str(topo.local_world_size),
        LOCAL_SIZE=str(topo.local_world_size),  # DeepSpeed's CPU accelerator reads this name
        MASTER_ADDR=topo.master_addr,
        MASTER_PORT=str(topo.master_port),
    )
    if tdist.is_initialized():
        return topo
    die_with_launcher()  # armed at import already (fpo_ds/__init__.py); again for a process that imported otherwise
    skip_shm_comm()
    deepspeed.init_distributed(
        dist_init_required=True, timeout=datetime.timedelta(minutes=timeout_minutes), auto_mpi_discovery=False
    )
    log_all(f"rank {topo.rank}/{topo.world_size} (local {topo.local_rank}/{topo.local_world_size}) up")
    stop_on_signals()
    nodes = max(1, topo.world_size // max(1, topo.local_world_size))
    log(
        f"topology ({topo.source}): world {topo.world_size}, {nodes} node(s) x {topo.local_world_size} rank(s), "
        f"master {topo.master_addr}:{topo.master_port}, backend {tdist.get_backend()}"
    )
    from deepspeed.accelerator import get_accelerator

    from fpo_ds import threads

    log(threads.apply(topo.local_world_size, on_cpu=get_accelerator().device_name() == "cpu"))
    return topo


def launched(env: dict | None = None) -> bool:
    """Whether a launcher started this process (torchrun, deepspeed, srun, mpirun), from its variables alone."""
    env = os.environ if env is None else env
    return (
        ("RANK" in env and "WORLD_SIZE" in env)
        or ("SLURM_PROCID" in env and "SLURM_STEP_ID" in env)
        or any(v in env for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))
    )


def die_with_launcher() -> None:
    """Under a launcher, this rank is killed when the launcher dies (kill -9 included): no orphan outlives its job.

    Linux's parent-death signal, armed when fpo_ds is first imported (a few hundred milliseconds
    after the launcher starts the rank, before torch is imported and long before any rendezvous
    wait). A launcher that died even earlier is noticed at arming: the parent is then init (pid
    1), or not the `fpo-ds launch` process that started the rank. A rank started by hand (no
    launcher) is left alone, so nohup still works.
    """
    if not launched() or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    expected = os.environ.pop(LAUNCHER_PID_VAR, None)  # for the rank only, not the processes it starts
    parent = os.getppid()
    if parent == 1 or (expected and expected.isdigit() and int(expected) != parent):
        os.write(2, b"fpo-ds: the launcher of this rank is gone; exiting\n")
        os._exit(1)


def shutdown(code: int) -> None:
    """End an entry point: leave the process group together, finalise MPI if used, exit with `code`.

    Interpreter teardown is skipped: a communication thread that still owns a tensor can abort
    the process while Python finalises (seen with gloo under mpirun), turning success into a crash.
    """
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()  # no rank tears down gloo/NCCL while a peer is still in a collective
        tdist.destroy_process_group()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
