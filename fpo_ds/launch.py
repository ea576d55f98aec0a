"""`fpo-ds launch [torchrun options] COMMAND [ARGS]`: torchrun that keeps the screen to fpo-ds's own messages.

    fpo-ds launch --nproc_per_node 8 train recipes/gemma-2-2b.yaml model.name_or_path=/ckpt/sft
    fpo-ds launch --nnodes 2 --node_rank $NODE_RANK --master_addr $HOST0 --nproc_per_node 8 train RECIPE

COMMAND is train, build-cache or generate (or `-m MODULE`). Every torchrun option works; this
is torch.distributed.run in this process, with four differences:

- A failure shows the failing rank's one paragraph, not torchrun's ChildFailedError block or its
  log lines (a rank that died by a signal, e.g. the kernel's out-of-memory kill, gets one line).
- The exit code says what happened: 0 done; 75 stopped by SIGTERM or SIGUSR1 (preemption: the
  ranks saved a checkpoint, so requeue and the run resumes); 130 stopped by Ctrl-C (checkpoint
  saved); otherwise the failing rank's code. Plain torchrun exits 1 for all of these.
- SIGUSR1 (Slurm's --signal) is forwarded to the ranks like SIGTERM and SIGINT, and the ranks get
  --shutdown-timeout 300 s (torchrun: 30) to finish their step and save before they are killed.
- The ranks know the launcher's pid, so one started just as the launcher died exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from fpo_ds import dist

COMMANDS = {"train": "fpo_ds.train", "build-cache": "fpo_ds.cache_build", "generate": "fpo_ds.generate"}
EXIT_REQUEUE, EXIT_INTERRUPTED = 75, 130  # as fpo_ds.train.Preemption
SHUTDOWN_TIMEOUT_S = 300  # a step and a checkpoint save of a large model take minutes; torchrun waits 30 s


def parse(argv: list[str]) -> argparse.Namespace:
    from torch.distributed import run as torchrun

    parser = torchrun.get_args_parser()
    parser.prog = "fpo-ds launch"
    parser.usage = "fpo-ds launch [torchrun options] {train,build-cache,generate} [ARGS]"
    args = parser.parse_args(argv)
    script = args.training_script
    given = set(argv[: argv.index(script)] if script in argv else argv)  # torchrun's options, as typed
    if not args.module:
        if args.training_script not in COMMANDS:
            parser.error(
                f"{args.training_script!r} is not an fpo-ds command: use one of {', '.join(COMMANDS)} (or -m MODULE)"
            )
        args.training_script, args.module = COMMANDS[args.training_script], True
    if hasattr(args, "signals_to_handle") and not given & {"--signals-to-handle", "--signals_to_handle"}:
        if "TORCHELASTIC_SIGNALS_TO_HANDLE" not in os.environ and "SIGUSR1" not in args.signals_to_handle:
            args.signals_to_handle += ",SIGUSR1"
    if getattr(args, "shutdown_timeout", 0) is None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = SHUTDOWN_TIMEOUT_S
    return args


def exit_code(exitcodes: list[int]) -> int:
    """The launch's code from its ranks' codes (negative: killed by that signal)."""
    codes = [c for c in exitcodes if c != 0]
    if not codes:
        return 0
    for c in codes:  # a real failure outranks a rank that stopped because of it
        if c not in (EXIT_REQUEUE, EXIT_INTERRUPTED):
            return 128 - c if c < 0 else c
    return EXIT_INTERRUPTED if EXIT_INTERRUPTED in codes else EXIT_REQUEUE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    early = {signal.SIGTERM: EXIT_REQUEUE, signal.SIGUSR1: EXIT_REQUEUE, signal.SIGINT: EXIT_INTERRUPTED}
    for sig, code in early.items():  # before any rank starts there is nothing to save (torchrun replaces these)
        signal.signal(sig, lambda *_, code=code: sys.exit(code))
    args = parse(argv)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ[dist.LAUNCHER_PID_VAR] = str(os.getpid())  # the ranks' parent: torchrun's agent runs in here
    logging.disable(logging.ERROR)  # torchrun's own lines (its failure report included); the ranks speak
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        for rank, f in sorted(e.failures.items()):
            if f.exitcode < 0:  # nobody else will say it: the rank could not
                name = signal.Signals(-f.exitcode).name if -f.exitcode in signal.valid_signals() else -f.exitcode
                print(f"fpo-ds launch: rank {rank} (pid {f.pid}) was killed by {name}", file=sys.stderr, flush=True)
        return exit_code([f.exitcode for f in e.failures.values()])
    except SignalException as e:  # torchrun forwarded it to the ranks and waited for them to save
        return EXIT_INTERRUPTED if e.sigval == signal.SIGINT else EXIT_REQUEUE
    return 0


if __name__ == "__main__":
    sys.exit(main())
