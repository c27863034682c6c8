"""An offline multiple-choice task in lm-eval's own task format, built from held-out text.

The paper's zero-shot tasks (ARC, BoolQ, HellaSwag, ...) come from the Hugging Face hub. Where
the hub is out of reach, ``next_sentence`` asks the same kind of question of held-out prose:
given a few sentences, which of four candidates is the true next sentence? The three distractors
are sentences of similar length from far away in the same held-out text, so the task rewards a
model that follows the story, not one that prefers short or long answers.

Pure Python (no torch): the builder writes ``items.jsonl`` and ``<task>.yaml`` into a folder that
``lm_eval.tasks.TaskManager(include_path=folder)`` loads like any packaged task.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from efficientllm.errors import ConfigError, DataError

TASK_NAME = "next_sentence"
BUILDER_VERSION = 2
"""Bumped whenever the same text and spec would give different items (part of the task hash)."""

# Titles that end in a full stop but do not end a sentence (Austen and most English prose).
_ABBREV = {"mr", "mrs", "ms", "dr", "st", "col", "capt", "esq", "messrs", "rev", "gen", "lt"}
_END = re.compile(r"[.!?][\"'\u201d\u2019)]*\s+(?=[\"'\u201c\u2018(]?[A-Z])")


def _is_initial(word: str) -> bool:
    """``J.`` in ``J. Smith``: one capital letter (not the pronoun ``I``) before a full stop."""
    return len(word) == 1 and word.isupper() and word != "I"


def split_sentences(text: str) -> list[str]:
    """Sentences of running prose (paragraphs joined, whitespace collapsed)."""
    flat = " ".join(text.split())
    out, start = [], 0
    for m in _END.finditer(flat):
        word = flat[start : m.start()].rsplit(" ", 1)[-1].strip("\"'(\u201c\u2018")
        if word.lower() in _ABBREV or _is_initial(word):
            continue
        out.append(flat[start : m.end()].strip())
        start = m.end()
    tail = flat[start:].strip()
    if tail:
        out.append(tail)
    return out


@dataclass(frozen=True, kw_only=True)
class NextSentenceSpec:
    """How the items are drawn; part of the task's identity (its hash names the folder)."""

    n_items: int = 200
    context_sentences: int = 3
    n_choices: int = 4
    min_chars: int = 30
    max_chars: int = 240
    max_context_chars: int = 600
    min_distance: int = 50
    """Distractors come from at least this many sentences away from the true one."""
    length_ratio: float = 1.5
    """Distractor length within [len/ratio, len*ratio] of the true sentence."""
    seed: int = 0


def _check_spec(spec: NextSentenceSpec) -> None:
    problems = []
    if spec.n_items < 1:
        problems.append(f"n_items must be at least 1, got {spec.n_items}")
    if spec.n_choices < 2:
        problems.append(f"n_choices must be at least 2, got {spec.n_choices}")
    if spec.context_sentences < 1:
        problems.append(f"context_sentences must be at least 1, got {spec.context_sentences}")
    if not 1 <= spec.min_chars <= spec.max_chars:
        problems.append(
            f"need 1 <= min_chars <= max_chars, got {spec.min_chars} and {spec.max_chars}"
        )
    if spec.length_ratio < 1:
        problems.append(f"length_ratio must be at least 1, got {spec.length_ratio}")
    if spec.min_distance < 1:
        problems.append(f"min_distance must be at least 1, got {spec.min_distance}")
    if problems:
        raise ConfigError(problems)


def build_items(docs: list[str], spec: NextSentenceSpec = NextSentenceSpec()) -> list[dict]:
    """``{"context", "choices", "label", "where"}`` items from ``docs`` (held-out text).

    The same ``docs`` and ``spec`` always give the same items; the choices of an item are
    distinct texts."""
    _check_spec(spec)
    sents: list[tuple[int, int, str]] = []  # (doc, index in doc, sentence)
    for d, text in enumerate(docs):
        sents += [(d, i, s) for i, s in enumerate(split_sentences(text))]
    ok = [spec.min_chars <= len(s) <= spec.max_chars for _, _, s in sents]
    candidates = []
    for k in range(spec.context_sentences, len(sents)):
        d, i, s = sents[k]
        if not ok[k] or i < spec.context_sentences:
            continue
        context = " ".join(x for _, _, x in sents[k - spec.context_sentences : k])
        if len(context) <= spec.max_context_chars:
            candidates.append((k, context))
    if len(candidates) < spec.n_items or len(sents) < 2 * spec.min_distance:
        raise DataError(
            f"the held-out text has {len(sents)} sentences, {len(candidates)} usable; the "
            f"next-sentence task needs {spec.n_items} items: give more held-out text or fewer items"
        )
    rng = random.Random(spec.seed)
    picked = sorted(rng.sample(candidates, spec.n_items))
    items = []
    for k, context in picked:
        true = sents[k][2]
        lo, hi = len(true) / spec.length_ratio, len(true) * spec.length_ratio
        pool = list(
            dict.fromkeys(  # each text once: a repeated sentence must not fill two choices
                sents[j][2]
                for j in range(len(sents))
                if ok[j]
                and abs(j - k) >= spec.min_distance
                and lo <= len(sents[j][2]) <= hi
                and sents[j][2] != true
            )
        )
        if len(pool) < spec.n_choices - 1:
            raise DataError(
                "the held-out text is too short to draw distractor sentences of similar length; "
                "give more held-out text"
            )
        distractors = rng.sample(pool, spec.n_choices - 1)
        label = rng.randrange(spec.n_choices)
        choices = distractors[:label] + [true] + distractors[label:]
        items.append(
            {
                "context": context,
                "choices": choices,
                "label": label,
                "where": f"doc {sents[k][0]} sentence {sents[k][1]}",
            }
        )
    return items


def _yaml(task: str, data_file: Path, cache_dir: Path) -> str:
    # JSON is valid YAML; lm-eval reads the file with its own YAML loader.
    cfg = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(data_file)},
            "cache_dir": str(cache_dir),
        },
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "description": "true next sentence among four"},
    }
    return json.dumps(cfg, indent=2) + "\n"


def write_task(items: list[dict], out_dir: Path, *, task: str = TASK_NAME) -> Path:
    """Write ``items.jsonl`` + ``<task>.yaml`` into ``out_dir`` (created); returns the folder."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "items.jsonl"
    _write_atomic(data, "".join(json.dumps(it) + "\n" for it in items))
    # the YAML last: its presence marks a complete task (build_task reuses the folder then)
    _write_atomic(out_dir / f"{task}.yaml", _yaml(task, data, out_dir / "hf-cache"))
    return out_dir


def _write_atomic(path: Path, text: str) -> None:
    """Readers (another process building the same task) never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")  # the umask's permissions, as the cache's
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def task_fingerprint(docs: list[str], spec: NextSentenceSpec) -> str:
    """Short hash of the text and the spec: the same inputs always give the same items."""
    h = hashlib.sha256(json.dumps([BUILDER_VERSION, spec.__dict__], sort_keys=True).encode())
    for text in docs:
        h.update(hashlib.sha256(text.encode("utf-8")).digest())
    return h.hexdigest()[:12]


def build_task(docs: list[str], root: Path, spec: NextSentenceSpec = NextSentenceSpec()) -> Path:
    """The task folder for ``docs`` under ``root`` (built once per text + spec, then reused)."""
    folder = Path(root) / f"{TASK_NAME}-{task_fingerprint(docs, spec)}"
    if not (folder / f"{TASK_NAME}.yaml").is_file():
        write_task(build_items(docs, spec), folder)
    return folder
