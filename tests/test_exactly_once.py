"""Every training sample exactly once across a crash and a resume (reliability checklist R20).

The sampler's ``last_indices`` are logged for every batch the trainer draws. Attempt 1 crashes
while drawing the batch of step 14 (its newest checkpoint is step 10); attempt 2 resumes from the
checkpoint. The batches of attempt 1 up to the checkpoint followed by all of attempt 2's equal the
uninterrupted run's batches: no block skipped, none repeated, in the same order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tiny import save_tiny_corpus, save_tiny_source

from efficientllm.presets import build_config
from efficientllm.training.data import BlockSampler
from efficientllm.training.events import ListSink
from efficientllm.training.trainer import Trainer

CRASH_AT = 14  # the batch whose draw fails; checkpoints every 5 steps, so step 10 survives


class Crash(RuntimeError):
    pass


def _record(monkeypatch: pytest.MonkeyPatch, log: list[list[int]], crash_at: int | None) -> None:
    """Log each batch's block indices; raise while drawing batch number ``crash_at``."""
    real_next = BlockSampler.__next__

    def spy(self: BlockSampler) -> Any:
        if crash_at is not None and len(log) + 1 == crash_at:
            raise Crash(f"killed while drawing batch {crash_at}")
        batch = real_next(self)
        log.append(list(self.last_indices))
        return batch

    monkeypatch.setattr(BlockSampler, "__next__", spy)


def test_each_block_is_consumed_once_across_a_crash_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = save_tiny_source(tmp_path / "src", "llama_gqa_tied")
    docs = save_tiny_corpus(tmp_path / "corpus")

    def cfg(out: str) -> Any:
        return build_config(
            preset="tiny-debug",
            overrides={
                "model": {"source": str(src)},
                "data": {"train": [str(p) for p in docs]},
                "train": {"checkpoint_every": 5, "grad_accum": 1, "device": "cpu"},
                "out_dir": str(tmp_path / out),
            },
        )

    reference: list[list[int]] = []
    with monkeypatch.context() as m:
        _record(m, reference, crash_at=None)
        ref = Trainer(cfg("reference"), sink=ListSink()).run()
    assert ref.status == "finished" and len(reference) == ref.step == 40

    first: list[list[int]] = []
    with monkeypatch.context() as m:
        _record(m, first, crash_at=CRASH_AT)
        with pytest.raises(Crash):
            Trainer(cfg("crashed"), sink=ListSink()).run()
    assert len(first) == CRASH_AT - 1  # steps 1..13 drew their batches; 11..13 are rolled back

    second: list[list[int]] = []
    with monkeypatch.context() as m:
        _record(m, second, crash_at=None)
        resumed = Trainer(cfg("crashed"), sink=ListSink()).run()
    assert resumed.status == "finished" and len(second) == 40 - 10  # resumed from step 10

    consumed = first[:10] + second
    assert consumed == reference  # the same blocks, in the same order: none skipped or repeated
    assert first[10:] == reference[10:13]  # the rolled-back draws were those of steps 11..13
