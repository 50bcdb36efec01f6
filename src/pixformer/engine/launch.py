"""`pixformer launch`: `pixformer train` over N processes of this machine, started as torchrun starts
them (torch.distributed.run with a standalone rendezvous: the same ranks, environment and restarts),
with pixformer's messages only.

    pixformer launch --nproc-per-node 2 train --model vit-n/4 --data digits --out runs/two

A stop (Ctrl-C, SIGTERM to the launcher or its process group) ends with the ranks' one line (the step,
the checkpoint, how to continue) and exit code 128 + the signal, where torchrun adds a traceback of its
own; bad input ends with rank 0's one line and exit code 2; a rank that fails otherwise has printed why
itself, and the launcher adds one line naming it and its exit code. torchrun's own log lines (its
defaults, its shutdown notices) are left out. Several machines: torchrun itself (docs/distributed.md).
"""
from __future__ import annotations

import logging
import os
import sys

from ..errors import PixformerError

EXAMPLE = "pixformer launch --nproc-per-node 2 train --model vit-n/4 --data digits"
STOPPED = (2, 130, 143)   # exit codes whose rank said why in one line: bad input, Ctrl-C, SIGTERM
LAUNCHER_ENV = "PIXFORMER_LAUNCHER"   # how the ranks were launched, for the command that continues a stopped run


def check(nproc_per_node: int, max_restarts: int, command: list[str]) -> None:
    """One line before any process starts, for what the launch itself cannot run."""
    if nproc_per_node < 1:
        raise PixformerError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    if max_restarts < 0:
        raise PixformerError(f"--max-restarts must be 0 or more, got {max_restarts}")
    if not command or command[0] != "train":
        got = f"got {command[0]!r}" if command else "got nothing"
        raise PixformerError(f"pixformer launch runs `pixformer train` over processes: give train and its "
                             f"options after the launch's own ({got}), e.g. {EXAMPLE}")
    if max_restarts and not _resumes(command):
        raise PixformerError("--max-restarts starts every rank again from the run's last checkpoint: give train "
                             "--resume true and --out (the first attempt starts from scratch)")


def _resumes(command: list[str]) -> bool:
    """Whether train's options ask to resume (a --config file may: trusted to)."""
    for i, tok in enumerate(command):
        if tok.startswith("--resume"):
            value = tok.partition("=")[2] if "=" in tok else (command[i + 1] if i + 1 < len(command) else "")
            return value.startswith("--") or value.lower() in ("", "true", "yes", "1", "on")
    return "--config" in command or any(tok.startswith("--config=") for tok in command)


def _quiet_torchrun() -> None:
    """torchrun's loggers (each set to its own level when created) held to critical messages."""
    import torch.distributed.run  # noqa: F401  (creates them)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch(nproc_per_node: int, command: list[str], max_restarts: int = 0) -> int:
    """Run `pixformer COMMAND...` (train) in `nproc_per_node` processes; returns the exit code."""
    check(nproc_per_node, max_restarts, command)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    _quiet_torchrun()
    args = parse_args(["--standalone", f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}",
                       "--module", "pixformer", *command])
    before = os.environ.get(LAUNCHER_ENV)
    os.environ[LAUNCHER_ENV] = f"pixformer launch --nproc-per-node {nproc_per_node}" + (
        f" --max-restarts {max_restarts}" if max_restarts else "")                # the ranks inherit it
    try:
        run(args)
    except SignalException as e:             # the launcher was signalled; its ranks were sent SIGTERM and said so
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code in STOPPED:
            return code
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        print(f"pixformer: rank {rank} {how}" + (f" after {max_restarts} restarts" if max_restarts else "")
              + "; its own message, if any, is above", file=sys.stderr)
        return 1 if code < 0 else code
    finally:
        if before is None:
            del os.environ[LAUNCHER_ENV]
        else:
            os.environ[LAUNCHER_ENV] = before
    return 0
