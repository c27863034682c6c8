"""One job on several processes (data parallel): who this process is, the collectives the loop
needs, the rank's share of each global batch, the check that every rank took the same pruning
decision, and re-wrapping the model after the parameters changed shape.

Why the decisions agree: DDP all-reduces (averages) the gradients in the last backward of a step,
so every rank holds the same ``.grad``; the weights start equal (DDP broadcasts rank 0's at each
wrap) and get equal updates, and the scorer's random generator has the same seed on every rank.
So ``compute_unit_scores`` and ``decide`` see the same numbers everywhere. The digest of the drop
list is still all-gathered and compared before anything is removed (``check_decision``): a
mismatch raises ``DecisionMismatchError`` on every rank instead of diverging silently.

Launchers (``torchrun``, ``accelerate launch``, ``launch.spawn``) set ``RANK``/``WORLD_SIZE``;
``Accelerator()`` then creates the process group (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from efficientllm.errors import ConfigError, DecisionMismatchError
from efficientllm.pruning.decide import Drops
from efficientllm.training.data import BlockSampler
from efficientllm.training.events import Event

log = logging.getLogger(__name__)
T = TypeVar("T")

UNSUPPORTED = {
    "FSDP": "FSDP is not supported for pruning-aware runs yet (the pruner slices whole weights "
    "and AdamW moments in place; sharded DTensor parameters would have to be gathered, sliced "
    "and re-sharded at every event, which is not implemented); launch without FSDP (plain "
    "`accelerate launch` or `torchrun` gives DDP)",
    "DEEPSPEED": "DeepSpeed is not supported; launch with DDP (plain `accelerate launch`)",
    "MEGATRON_LM": "Megatron-LM is not supported; launch with DDP (plain `accelerate launch`)",
    "XLA": "XLA/TPU is not supported; use CPUs or CUDA GPUs",
}


def env_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched)."""
    return int(os.environ.get("RANK", "0") or 0)


def env_world_size() -> int:
    """How many processes the launcher started (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


class NullSink:
    """The event sink of every rank but 0: events are emitted once, by rank 0."""

    def emit(self, event: Event) -> None:
        del event


@dataclass(frozen=True)
class World:
    """The data-parallel group this process belongs to (``size == 1``: a plain run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    """Where collective tensors live (NCCL needs CUDA tensors, gloo CPU ones)."""

    @classmethod
    def from_accelerator(cls, accel: Any, device: torch.device) -> World:
        """The world of an initialised ``Accelerator``; refuses what this loop cannot do."""
        kind = str(accel.distributed_type).rsplit(".", 1)[-1]
        fsdp_env = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if fsdp_env and accel.num_processes > 1:
            kind = "FSDP"
        if kind in UNSUPPORTED:
            raise ConfigError(UNSUPPORTED[kind])
        if accel.num_processes == 1:
            return cls(device=device)
        if device.type == "cuda":
            device = torch.device("cuda", accel.local_process_index)
            torch.cuda.set_device(device)
        return cls(accel.process_index, accel.num_processes, accel.local_process_index, device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- collectives (no-ops on one process) ----------------------------------------------
    def barrier(self) -> None:
        if self.size > 1:
            tdist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (a stop request seen by one rank)."""
        if self.size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean over ranks of each value (every rank gets the same numbers)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return (t / self.size).tolist()

    def sum_(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over ranks, in place."""
        if self.size > 1:
            tdist.all_reduce(tensor)

    def gather(self, obj: T) -> list[T]:
        """``obj`` of every rank, in rank order."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        tdist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only (checkpoint, export, evaluation); the others wait and get
        its result."""
        result = fn() if self.main else None
        if self.size == 1:
            return result  # type: ignore[return-value]
        box = [result]
        tdist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    # ---- data -----------------------------------------------------------------------------
    def sampler(self, blocks: torch.Tensor, *, batch_size: int, seed: int) -> BlockSampler:
        """This rank's sampler: ``batch_size`` blocks per process and micro-batch."""
        if self.size == 1:
            return BlockSampler(blocks, batch_size=batch_size, seed=seed)
        return ShardedSampler(blocks, batch_size=batch_size, seed=seed, world=self)

    # ---- model ----------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DDP (itself on one process). After a pruning event call ``release`` on
        the old wrapper first and drop every reference to it."""
        if self.size == 1:
            return model
        gc.collect()  # a released wrapper's reducer must be gone (see ``release``)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    @staticmethod
    def release(net: torch.nn.Module | None) -> None:
        """Dismantle a DDP wrapper whose parameters are about to change shape: its reducer holds
        the parameters' gradient accumulators, which remember the old shapes, and its hooks
        would reduce into stale buckets. Returns None (assign it over the old reference)."""
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net._remove_autograd_hooks()
            del net.reducer

    @staticmethod
    def sync_context(net: torch.nn.Module, *, last: bool) -> AbstractContextManager[Any]:
        """Skip the gradient all-reduce on every micro-batch but the step's last."""
        if last or not isinstance(net, torch.nn.parallel.DistributedDataParallel):
            return nullcontext()
        return net.no_sync()

    # ---- decisions ------------------------------------------------------------------------
    def check_decision(self, drops: Drops, *, step: int) -> str:
        """The digest of ``drops``; raises ``DecisionMismatchError`` on every rank when the
        ranks' digests differ (before anything is removed)."""
        digest = drops_digest(drops)
        digests = self.gather(digest)
        if len(set(digests)) > 1:
            table = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
            raise DecisionMismatchError(
                f"the ranks chose different groups to prune at step {step} ({table}); their "
                "saliency diverged (gradients not all-reduced, or non-deterministic scoring); "
                "nothing was removed"
            )
        return digest


def drops_digest(drops: Drops) -> str:
    """sha256 of a canonical JSON form of a drop list (equal drops, equal digest)."""

    def per_layer(d: dict[int, set[int]]) -> dict[str, list[int]]:
        return {str(k): sorted(v) for k, v in sorted(d.items()) if v}

    canon = {
        "q": per_layer(drops.q),
        "kv": per_layer(drops.kv),
        "ffn": per_layer(drops.ffn),
        "hidden": sorted(drops.hidden),
        "layers": sorted(drops.layers),
    }
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()


class ShardedSampler(BlockSampler):
    """Rank ``r``'s share of the global batch: the global sampler draws ``batch_size x world``
    blocks (the order a one-process run with that batch draws) and rank ``r`` takes rows
    ``[r*batch_size, (r+1)*batch_size)``. Its state is the global position, so a checkpoint
    resumes on any number of processes with the same global batch."""

    def __init__(self, blocks: torch.Tensor, *, batch_size: int, seed: int, world: World):
        super().__init__(blocks, batch_size=batch_size * world.size, seed=seed)
        self.per_rank, self.rank = batch_size, world.rank

    def __next__(self) -> torch.Tensor:
        batch = super().__next__()
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        self.last_indices = self.last_indices[lo:hi]
        return batch[lo:hi]
