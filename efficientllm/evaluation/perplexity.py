"""Held-out perplexity of a causal LM over a token stream, with a stated protocol.

Windows of ``block_len`` model positions move by ``stride`` tokens; each window scores only
tokens no earlier window scored (the standard strided evaluation), so every token is scored
exactly once. With ``stride == block_len`` the windows are independent blocks and the first
token of each block has no context (unscored) unless a BOS is prepended.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from efficientllm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    """Perplexity and the protocol it was measured under."""

    ppl: float
    nll: float
    """Mean negative log-likelihood per scored token (nats)."""
    n_tokens_scored: int
    block_len: int
    """Model input length per window, BOS included."""
    stride: int
    bos: bool
    """Whether a BOS token was prepended to each window (never scored)."""
    protocol: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Window:
    ids: list[int]
    labels: list[int]


def _windows(stream: list[int], block_len: int, stride: int, bos_id: int | None) -> list[_Window]:
    """Cut the stream into model inputs and labels (``IGNORE`` where nothing is scored)."""
    cap = block_len - (bos_id is not None)
    prefix = [] if bos_id is None else [bos_id]
    windows, scored_until = [], 0 if bos_id is not None else 1
    for begin in range(0, len(stream), stride):
        end = min(begin + cap, len(stream))
        ids = prefix + stream[begin:end]
        first = len(prefix) + max(scored_until - begin, 0)  # position of first new token
        first = max(first, 1)  # position 0 has no context
        labels = [IGNORE] * first + ids[first:]
        if first < len(ids):  # a lone unscorable token needs no forward pass
            windows.append(_Window(ids, labels))
        scored_until = end
        if end == len(stream):
            break
    return windows


def _batches(windows: list[_Window], batch_size: int) -> list[list[_Window]]:
    """Group consecutive windows of equal length into batches (no padding needed)."""
    batches: list[list[_Window]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and len(batches[-1][0].ids) == len(w.ids):
            batches[-1].append(w)
        else:
            batches.append([w])
    return batches


def perplexity(
    model: torch.nn.Module,
    stream: torch.Tensor,
    *,
    block_len: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    bos_id: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` (any HF causal LM returning ``.logits``) on a 1-D token stream.

    ``block_len`` is the model input length, BOS included, so with ``bos_id`` each window holds
    ``block_len - 1`` stream tokens; ``stride`` defaults to that capacity (no overlap).
    ``max_tokens`` keeps only the first tokens of the stream. ``progress(done, total)`` is
    called after each batch with counts of windows.
    """
    if stream.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(stream.shape)}")
    cap = block_len - (bos_id is not None)
    stride = cap if stride is None else stride
    problems = []
    if cap < 1 or (bos_id is None and block_len < 2):
        problems.append(f"block_len must be at least 2, got {block_len}")
    if not 1 <= stride <= max(cap, 1):
        problems.append(f"stride must be between 1 and {cap} (block_len minus BOS), got {stride}")
    if batch_size < 1:
        problems.append(f"batch_size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        problems.append(f"max_tokens must be at least 2, got {max_tokens}")
    if problems:
        raise ConfigError(problems)
    tokens = stream[:max_tokens].tolist() if max_tokens is not None else stream.tolist()
    if len(tokens) < 2:
        raise DataError(f"the evaluation text has {len(tokens)} token(s); give more held-out text")

    windows = _windows(tokens, block_len, stride, bos_id)
    batches = _batches(windows, batch_size)
    device = next(model.parameters()).device
    nll_sum, n_scored, done = 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                ids = torch.tensor([w.ids for w in batch], dtype=torch.long, device=device)
                labels = torch.tensor([w.labels for w in batch], dtype=torch.long, device=device)
                logits = model(input_ids=ids, use_cache=False).logits
                targets = labels[:, 1:]
                loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    targets.reshape(-1),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
                nll_sum += float(loss)
                n_scored += int((targets != IGNORE).sum())
                done += len(batch)
                if progress is not None:
                    progress(done, len(windows))
    finally:
        model.train(was_training)

    if n_scored == 0:
        raise DataError("no token could be scored; give more text or a longer block_len")
    nll = nll_sum / n_scored
    ppl = math.exp(nll) if nll < 700 else math.inf
    protocol = (
        f"block {block_len}, stride {stride}, {n_scored} tokens scored, "
        f"BOS prepended: {'yes' if bos_id is not None else 'no'}"
    )
    log.info("perplexity %.3f (%s)", ppl, protocol)
    return PerplexityResult(
        ppl=ppl,
        nll=nll,
        n_tokens_scored=n_scored,
        block_len=block_len,
        stride=stride,
        bos=bos_id is not None,
        protocol=protocol,
    )
