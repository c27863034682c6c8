"""The data of one run: documents -> split -> tokens -> packed blocks + a held-out stream.

Sources in ``DataConfig.train``/``heldout``: local files or folders, ``hub:<dataset id>``
(streamed through ``datasets``), or ``demo:austen`` (Jane Austen's novels without the held-out
book) and ``demo:austen-heldout`` (the held-out book), prepared by ``efficientllm demo-data``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from efficientllm.config import DataConfig
from efficientllm.training.data import (
    Document,
    load_hub_dataset,
    pack_blocks,
    read_documents,
    split_documents,
    tokenize_documents,
)

log = logging.getLogger(__name__)


@dataclass
class RunData:
    train_blocks: torch.Tensor
    """[N, block_len] training blocks."""
    heldout: torch.Tensor
    """1-D held-out token stream."""
    split: dict[str, list[str]]
    """Document names on each side of the split (written into the run's events)."""


def _read(sources: list[str], text_field: str) -> list[Document]:
    docs: list[Document] = []
    files: list[str] = []
    for src in sources:
        if src in ("demo:austen", "demo:austen-heldout"):
            from efficientllm.assets import DEMO_HELDOUT_BOOK, austen_books

            books = austen_books()
            held = src.endswith("heldout")
            files += [str(p) for t, p in books.items() if (t == DEMO_HELDOUT_BOOK) == held]
        elif src.startswith("hub:"):
            docs += load_hub_dataset(src[4:], text_field=text_field)
        else:
            files.append(src)
    if files:
        docs += read_documents(files, text_field=text_field)
    return docs


def validate_sources(cfg: DataConfig) -> None:
    """Read (and so validate) every local source without tokenising: fails fast on bad files."""
    _read([s for s in cfg.train + cfg.heldout if not s.startswith("hub:")], cfg.text_field)


def prepare(cfg: DataConfig, tokenizer: Any, *, seed: int) -> RunData:
    """Documents -> (train blocks, held-out stream). The split is by document, never by line."""
    docs = _read(cfg.train, cfg.text_field)
    if cfg.heldout:
        train, held = docs, _read(cfg.heldout, cfg.text_field)
    else:
        train, held = split_documents(docs, heldout=cfg.heldout_fraction, seed=seed)
    stream = tokenize_documents(train, tokenizer, add_bos=False)
    blocks = pack_blocks(stream, cfg.block_len)
    held_stream = tokenize_documents(held, tokenizer, add_bos=False)
    log.info(
        "data: %d train blocks of %d tokens, %d held-out tokens",
        len(blocks),
        cfg.block_len,
        held_stream.numel(),
    )
    return RunData(
        train_blocks=blocks,
        heldout=held_stream,
        split={"train": [d.name for d in train], "heldout": [d.name for d in held]},
    )
