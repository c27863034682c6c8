"""Atomic, pickle-free, resumable checkpoints.

Layout: ``<dir>/step-000050/`` holding ``model.safetensors``, ``optimizer.safetensors``,
``saliency.safetensors``, ``rng.safetensors`` and ``state.json`` (step, tokens, shape, model
config, optimizer hyper-parameters, data position, Python RNG), then ``COMPLETE`` (sha256 of every
file), written last. A checkpoint is built in ``.tmp-step-...``, fsynced, and renamed into place;
only folders whose ``COMPLETE`` matches their files count. A partial or corrupt one is skipped with
a warning and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
FILES = (
    "model.safetensors",
    "optimizer.safetensors",
    "saliency.safetensors",
    "rng.safetensors",
    "state.json",
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters with tied ones once (the order optimizers are built in)."""
    seen, out = set(), []
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def optimizer_tensors(model, optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Optimizer state as flat tensors keyed ``<param name>::<state key>`` + group settings."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in unique_named_parameters(model):
        for key, value in optimizer.state.get(p, {}).items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{name}::{key}"] = t.detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, groups


def load_optimizer_tensors(
    model, optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]
) -> None:
    params = dict(unique_named_parameters(model))
    for full, value in tensors.items():
        name, key = full.split("::", 1)
        p = params[name]
        optimizer.state[p][key] = value.to(p.device) if value.dim() else value.clone()
    for g, saved in zip(optimizer.param_groups, groups, strict=True):
        g.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor], py_state: list) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))


@dataclass
class Checkpoint:
    """What ``load_latest`` returns; tensors on CPU."""

    path: Path
    step: int
    state: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    saliency: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]


def save(
    root: str | Path,
    step: int,
    *,
    model,
    optimizer,
    saliency: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
    fault: Any = None,
    extra_rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root``; keep the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {n: p.detach().cpu().contiguous() for n, p in unique_named_parameters(model)}
    opt_tensors, groups = optimizer_tensors(model, optimizer)
    py = random.getstate()
    full_state = {
        **state,
        "step": step,
        "optimizer_groups": groups,
        "python_rng": [py[0], list(py[1]), py[2]],
        "model_config": model.config.to_dict(),
    }
    save_file(weights, tmp / "model.safetensors")
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    if fault:
        fault("ckpt_mid_write")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in saliency.items()},
        tmp / "saliency.safetensors",
    )
    save_file({**rng_tensors(), **(extra_rng or {})}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps(full_state, default=str), encoding="utf-8")
    for f in FILES:
        _fsync(tmp / f)
    marker = {f: _sha256(tmp / f) for f in FILES}
    (tmp / MARKER).write_text(json.dumps(marker), encoding="utf-8")
    _fsync(tmp / MARKER)
    if final.exists():  # a re-run of the same step after a crash: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    if fault:
        fault("after_rename")
    _prune_old(root, keep)
    return final


def _prune_old(root: Path, keep: int) -> None:
    done = complete_checkpoints(root, verify=False)
    for path in done[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def is_complete(path: Path, *, verify: bool = True) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        sums = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if set(sums) != set(FILES):
        return False
    if not verify:
        return all((path / f).is_file() for f in FILES)
    return all((path / f).is_file() and _sha256(path / f) == sums[f] for f in FILES)


def complete_checkpoints(root: str | Path, *, verify: bool = True) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.glob("step-*")):
        if is_complete(path, verify=verify):
            out.append(path)
        else:
            log.warning("skipping incomplete or corrupt checkpoint %s", path)
    return out


def clean_partial(root: str | Path) -> None:
    """Remove leftovers of interrupted writes (``.tmp-step-*``)."""
    for tmp in Path(root).glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_latest(root: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint under ``root`` (or None)."""
    for path in reversed(complete_checkpoints(root)):
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
            return Checkpoint(
                path=path,
                step=int(state["step"]),
                state=state,
                model=load_file(path / "model.safetensors"),
                optimizer=load_file(path / "optimizer.safetensors"),
                saliency=load_file(path / "saliency.safetensors"),
                rng=load_file(path / "rng.safetensors"),
            )
        except Exception as err:  # unreadable despite the marker: fall back to the previous
            log.warning("cannot read checkpoint %s (%s); trying an older one", path, err)
    return None
