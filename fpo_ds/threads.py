"""CPU threads per rank: chosen once at start-up (fpo_ds.dist.init), applied to torch, logged.

torch's default is one thread per core in every process, which is wrong for fpo-ds twice over:
ranks that share a node each take every core (ranks x cores threads on cores cores), and on the
CPU accelerator a rank's matrices are small, so a second thread costs more in hand-offs than it
saves. Measured on a busy 2-core machine, `fpo-ds train recipes/tiny.yaml` alone (20 steps):
29 s in steps with torch's 2 threads, 6 s with 1 thread, same losses.

The rule (`OMP_NUM_THREADS` set by you, or by your launcher, always wins):
  - CPU accelerator: 1 thread per rank (the ranks are the parallelism: launch one per core);
  - GPU: the cores this process may use, split between the node's ranks (cores // ranks, >= 1),
    for the host-side work (data, ZeRO-offload's CPU optimizer).
Either way ranks per node x threads <= cores whenever there are at least as many cores as ranks.
"""

from __future__ import annotations

import os


def cores() -> int:
    """CPUs this process may run on (its affinity mask: taskset, Slurm's --cpus-per-task binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose(env: dict, n_cores: int, local_ranks: int, on_cpu: bool) -> tuple[int, str]:
    """(threads per rank, why) for a rank among `local_ranks` on a node with `n_cores` usable cores."""
    given = env.get("OMP_NUM_THREADS", "").strip()
    if given:
        try:
            n = int(given)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"OMP_NUM_THREADS={given!r}: expected a whole number >= 1 (threads per rank), or unset it")
        return n, "OMP_NUM_THREADS, set by you or your launcher"
    if on_cpu:
        return 1, "CPU accelerator: one thread per rank; export OMP_NUM_THREADS=N to change"
    return max(1, n_cores // max(1, local_ranks)), "cores // ranks on this node; export OMP_NUM_THREADS=N to change"


def apply(local_ranks: int, on_cpu: bool) -> str:
    """Set torch's thread count for this rank (and OMP_NUM_THREADS for its child processes); the log line."""
    import torch

    n_cores = cores()
    n, why = choose(os.environ, n_cores, local_ranks, on_cpu)
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return f"threads: {n} per rank x {local_ranks} rank(s) on this node, {n_cores} core(s) ({why})"
