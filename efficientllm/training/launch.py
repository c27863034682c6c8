"""Start the processes of one data-parallel job on this machine without a launcher CLI.

``torchrun`` and ``accelerate launch`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` for each process; ``rank_env`` gives the same variables, so a
process started by ``spawn`` (torch.multiprocessing) or by ``popen_ranks`` (one subprocess per
rank, what the worker uses: it keeps every rank's pid and exit code in the task process) looks
exactly like one started by ``torchrun --nproc_per_node N``.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.multiprocessing as mp


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int, host: str = "127.0.0.1") -> dict[str, str]:
    """The environment ``torchrun`` gives rank ``rank`` of ``world`` processes on one machine."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": host,
        "MASTER_PORT": str(port),
    }


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple) -> None:
    os.environ.update(rank_env(rank, world, port))
    fn(rank, *args)


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, port: int | None = None) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh processes (spawn) with the launcher's
    environment and wait; an exception in any process is raised here (the others are ended).
    ``fn`` and ``args`` must be picklable (a module-level function)."""
    mp.start_processes(
        _entry,
        args=(fn, nprocs, port or free_port(), args),
        nprocs=nprocs,
        join=True,
        start_method="spawn",
    )


def popen_ranks(
    cmd: Sequence[str], nprocs: int, *, env: Mapping[str, str] | None = None, **kw: Any
) -> list[subprocess.Popen]:
    """Start ``cmd`` once per rank as a subprocess (each with its rank's environment on top of
    ``env``, default this process's) and return them unwaited; ``kw`` goes to ``Popen``."""
    base, port = dict(os.environ if env is None else env), free_port()
    return [
        subprocess.Popen(list(cmd), env={**base, **rank_env(r, nprocs, port)}, **kw)
        for r in range(nprocs)
    ]
