"""The tokenizer part of a GGUF file: tokens, token types, merges, special ids, chat template.

Two tokenizer kinds are representable in llama.cpp and recognised here, both read from the fast
tokenizer's ``tokenizer.json``:

- byte-level BPE (GPT-2 style: SmolLM, Llama 3, Qwen2): ``tokenizer.ggml.model = "gpt2"`` with the
  merges and a pre-tokenizer name that llama.cpp knows (``gpt-2``, ``smollm``, ``llama-bpe``,
  ``qwen2``), picked from the HF pre-tokenizer;
- Metaspace BPE (SentencePiece style, ``▁`` for spaces): ``tokenizer.ggml.model = "llama"`` with
  scores that keep the merge order (earlier token id = higher score).

Anything else (WordPiece, Unigram, an unknown pre-tokenizer regex) raises ``ExportError`` rather
than writing a file that tokenizes differently from the source.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import gguf

from efficientllm.errors import ExportError

logger = logging.getLogger(__name__)

# Fragments of the HF pre-tokenizer regexes that identify llama.cpp's pre-tokenizer types.
_LLAMA3_REGEX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
_QWEN2_REGEX = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    backend = backend or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        kind = type(tokenizer).__name__
        raise ExportError(f"GGUF export needs a fast (tokenizers-backed) tokenizer, got {kind}")
    return json.loads(backend.to_str())


def _parts(node: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """A (possibly nested) tokenizers pipeline stage as a flat list of its components."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in node else "normalizers"
        return [p for sub in node.get(key, []) for p in _parts(sub)]
    return [node]


def _kind_and_pre(tj: Mapping[str, Any]) -> tuple[str, str | None]:
    """(``tokenizer.ggml.model``, ``tokenizer.ggml.pre``) for a tokenizer.json."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(
            f"GGUF export supports BPE tokenizers only, this one is {model.get('type')!r}"
        )
    pre = _parts(tj.get("pre_tokenizer"))
    types = [p.get("type") for p in pre]
    if "Metaspace" in types or (not pre and _parts(tj.get("normalizer"))):
        return "llama", None
    if "ByteLevel" not in types:
        raise ExportError(f"unsupported BPE pre-tokenizer {types}; expected ByteLevel or Metaspace")
    regexes = [
        str((p.get("pattern") or {}).get("Regex", "")) for p in pre if p.get("type") == "Split"
    ]
    byte_level = next(p for p in pre if p.get("type") == "ByteLevel")
    if not regexes:
        if not byte_level.get("use_regex", True):
            raise ExportError("a ByteLevel pre-tokenizer without a split regex is not supported")
        digits = [p for p in pre if p.get("type") == "Digits"]
        if digits and digits[0].get("individual_digits"):
            return "gpt2", "smollm"
        if digits:
            raise ExportError("a Digits pre-tokenizer that groups digits is not supported")
        return "gpt2", "gpt-2"
    if len(regexes) == 1 and regexes[0].startswith(_QWEN2_REGEX):
        return "gpt2", "qwen2"
    if len(regexes) == 1 and regexes[0].startswith(_LLAMA3_REGEX):
        return "gpt2", "llama-bpe"
    raise ExportError(
        f"the tokenizer's pre-tokenizer regex {regexes[0][:60]!r}... has no known llama.cpp "
        "equivalent; refusing to write a GGUF that would tokenize differently"
    )


def _merges(model: Mapping[str, Any]) -> list[str]:
    out = []
    for m in model.get("merges") or []:
        out.append(" ".join(m) if isinstance(m, (list, tuple)) else str(m))
    return out


def _special_id(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, f"{name}_token_id", None)
    return int(value) if isinstance(value, int) else None


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """Write ``tokenizer`` (a fast HF tokenizer) for a model with ``vocab_size`` embedding rows.

    Ids the tokenizer does not use (embedding rows beyond its vocabulary) become ``[PAD<i>]``
    tokens of type UNUSED, so the token list always has exactly ``vocab_size`` entries.
    """
    tj = _tokenizer_json(tokenizer)
    kind, pre = _kind_and_pre(tj)
    model = tj["model"]
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    special: dict[int, bool] = {}
    for added in tj.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        special[int(added["id"])] = bool(added.get("special"))
    if max(by_id, default=-1) >= vocab_size:
        raise ExportError(
            f"the tokenizer has token id {max(by_id)} but the model has only {vocab_size} "
            "embedding rows"
        )
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and tok.startswith("<0x") and tok.endswith(">") and len(tok) == 6:
            tokens.append(tok)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model(kind)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":
        writer.add_token_scores([-float(i) for i in range(vocab_size)])
    merges = _merges(model)
    if merges:
        writer.add_token_merges(merges)
    _add_special_ids(writer, tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    logger.debug("GGUF tokenizer: %s/%s, %d tokens, %d merges", kind, pre, len(tokens), len(merges))


def _add_special_ids(writer: gguf.GGUFWriter, tokenizer: Any) -> None:
    ids = {name: _special_id(tokenizer, name) for name in ("bos", "eos", "unk", "pad")}
    if ids["bos"] is not None:
        writer.add_bos_token_id(ids["bos"])
    if ids["eos"] is not None:
        writer.add_eos_token_id(ids["eos"])
    if ids["unk"] is not None:
        writer.add_unk_token_id(ids["unk"])
    if ids["pad"] is not None:
        writer.add_pad_token_id(ids["pad"])
    try:  # what the tokenizer really adds around a text (its post-processor decides)
        probe = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    except Exception as err:  # a tokenizer that cannot encode cannot be exported either
        raise ExportError(f"the tokenizer cannot encode text: {err}") from err
    writer.add_add_bos_token(ids["bos"] is not None and probe[:1] == [ids["bos"]])
    writer.add_add_eos_token(ids["eos"] is not None and probe[-1:] == [ids["eos"]])


__all__ = ["add_tokenizer"]
