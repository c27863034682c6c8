"""One job on several processes of this machine (``EFFICIENTLLM_GPUS_PER_JOB`` > 1).

The task process stays the job's owner: it keeps the lease and heartbeat, writes the events to
the DB through its own sink and turns a cancel into a stop request. It starts one subprocess per
rank (``python -m worker.parallel <job.json>`` with the environment ``torchrun --nproc_per_node
N`` would give; rank r takes GPU r of the worker's ``CUDA_VISIBLE_DEVICES``) and watches them.
Subprocesses rather than multiprocessing children: the prefork pool process is a daemon, and a
subprocess has a pid and an exit code of its own to watch and end.

Files in ``<out_dir>/parallel/`` (fresh for each attempt): ``job.json`` (config, fault, step
delay); ``events.jsonl`` (rank 0's events, forwarded to the task's sink as they appear);
``STOP`` (made by the task on cancel; every rank polls it and the ranks agree through an
all-reduce); ``error-<rank>.json`` (a typed error raised in a rank); ``result.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from efficientllm import errors
from efficientllm.config import RunConfig
from efficientllm.training.events import EventSink, event_from_dict
from efficientllm.training.result import RunResult

log = logging.getLogger(__name__)

KILLED = (137, -9)  # a SIGKILLed rank (the OOM killer, a fault hook)


class RankCrashed(RuntimeError):
    """A rank was killed; the task process goes down the same way so the job is retried."""


class _Tail:
    """Forwards the complete new lines of rank 0's event file to a sink."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def forward(self, sink: EventSink) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            if line.strip():
                sink.emit(event_from_dict(json.loads(line)))


def _end(procs: list[subprocess.Popen], grace_s: float) -> None:
    """Terminate the ranks still running, then kill those that do not exit in ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _remote_error(record: dict[str, str]) -> Exception:
    """The typed error a rank raised, rebuilt here (same class, same message)."""
    cls = getattr(errors, record["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, errors.EfficientLLMError)):
        return errors.EfficientLLMError(record["message"])
    err = cls.__new__(cls)
    Exception.__init__(err, record["message"])
    if isinstance(err, errors.ConfigError):
        err.problems = [record["message"]]
    return err


def _outcome(d: Path, procs: list[subprocess.Popen]) -> RunResult:
    for r in range(len(procs)):
        path = d / f"error-{r}.json"
        if path.is_file():
            raise _remote_error(json.loads(path.read_text(encoding="utf-8")))
    codes = [p.returncode for p in procs]
    if any(c in KILLED for c in codes):
        raise RankCrashed(f"a rank was killed (exit codes {codes})")
    if any(codes):
        raise RuntimeError(f"a rank failed (exit codes {codes}); see the worker log")
    r = json.loads((d / "result.json").read_text(encoding="utf-8"))
    export = Path(r["export"]) if r["export"] else None
    return RunResult(r["status"], r["step"], r["params"], export, {}, r["teacher_flops"])


def run_parallel(
    cfg: RunConfig,
    *,
    nprocs: int,
    sink: EventSink,
    should_stop: Callable[[], bool],
    step_delay_s: float = 0.0,
    fault: str | None = None,
    poll_s: float = 0.2,
) -> RunResult:
    """Run ``cfg`` on ``nprocs`` processes; returns rank 0's result or raises its error."""
    d = Path(cfg.out_dir) / "parallel"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    spec = {"config": cfg.to_dict(), "fault": fault, "step_delay_s": step_delay_s}
    (d / "job.json").write_text(json.dumps(spec), encoding="utf-8")
    from efficientllm.training.launch import popen_ranks

    cmd = [sys.executable, "-m", "worker.parallel", str(d / "job.json")]
    procs = popen_ranks(cmd, nprocs)
    log.info("job in %s: %d ranks, pids %s", cfg.out_dir, nprocs, [p.pid for p in procs])
    tail = _Tail(d / "events.jsonl")
    try:
        while any(p.poll() is None for p in procs):
            tail.forward(sink)
            if should_stop():
                (d / "STOP").touch()
            if any(p.returncode not in (None, 0) for p in procs):
                break  # one rank failed: the others cannot go on alone
            time.sleep(poll_s)
    finally:
        _end(procs, grace_s=10.0)
        tail.forward(sink)
    return _outcome(d, procs)


def rank_main(spec_path: Path) -> int:
    """One rank of a ``run_parallel`` job (``python -m worker.parallel <job.json>``)."""
    from efficientllm.training.distributed import env_rank
    from efficientllm.training.events import JsonlSink
    from efficientllm.training.trainer import Trainer

    d, rank = spec_path.parent, env_rank()
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    delay, fault = float(spec["step_delay_s"]), spec["fault"]

    def should_stop() -> bool:
        if delay:
            time.sleep(delay)
        return (d / "STOP").exists()

    def hook(name: str) -> None:
        if name == fault:
            log.warning("FAULT %s: rank %d exiting with 137", name, rank)
            os._exit(137)

    sink: Any = JsonlSink(d / "events.jsonl") if rank == 0 else None
    try:
        trainer = Trainer(
            RunConfig.from_dict(spec["config"]),
            sink=sink,
            should_stop=should_stop,
            fault=hook if fault else None,
        )
        res = trainer.run()
    except errors.EfficientLLMError as err:
        record = {"type": type(err).__name__, "message": str(err)}
        (d / f"error-{rank}.json").write_text(json.dumps(record), encoding="utf-8")
        return 3
    finally:
        if sink is not None:
            sink.close()
    if rank == 0:
        export = str(res.export_path) if res.export_path else None
        record2 = {"status": res.status, "step": res.step, "params": res.params}
        record2 |= {"export": export, "teacher_flops": res.teacher_flops}
        (d / "result.json").write_text(json.dumps(record2), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover - a rank subprocess
    logging.basicConfig(level=logging.INFO, format="%(levelname)s rank %(process)d %(message)s")
    sys.exit(rank_main(Path(sys.argv[1])))
