"""The offline next-sentence task: sentence splitting, deterministic items whose true choice is
the sentence that follows the context, length-matched distinct distractors, and a task folder
lm-eval loads like one of its own."""

from __future__ import annotations

import json
import random

import pytest

from efficientllm.errors import ConfigError, DataError
from efficientllm.evaluation.mctask import (
    TASK_NAME,
    NextSentenceSpec,
    build_items,
    build_task,
    split_sentences,
    write_task,
)

_WORDS = (
    "the garden was quiet in the evening and she walked to the house with a letter from her "
    "sister who had been in town for a week but said nothing of the visit nor of the weather"
)
WORDS = _WORDS.split()


def prose(seed: int, n_sentences: int) -> str:
    """Capitalised pseudo-English sentences of 6-16 words, in paragraphs of 2-6 sentences."""
    rng = random.Random(seed)
    sents = []
    for i in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
        end = rng.choice(".....?!")
        sents.append(f"{words[0].capitalize()} {' '.join(words[1:])} number {i}{end}")
    paras, i = [], 0
    while i < len(sents):
        n = rng.randint(2, 6)
        paras.append(" ".join(sents[i : i + n]))
        i += n
    return "\n\n".join(paras)


SMALL = NextSentenceSpec(n_items=20, context_sentences=2, min_distance=10, seed=3)


def test_split_keeps_titles_and_splits_on_end_marks_and_quotes() -> None:
    text = (
        'Mr. Elliot was there with Mrs. Clay and Dr. Shirley. "Is it you?" she asked! '
        "He bowed.\n\nThey walked on.  Was it late? \u201cNo.\u201d Then J. Smith came. "
        'Anne said, "Yes." Lady Russell smiled'
    )
    assert split_sentences(text) == [
        "Mr. Elliot was there with Mrs. Clay and Dr. Shirley.",
        '"Is it you?" she asked!',
        "He bowed.",
        "They walked on.",
        "Was it late?",
        "\u201cNo.\u201d",
        "Then J. Smith came.",
        'Anne said, "Yes."',
        "Lady Russell smiled",
    ]


def test_split_lowercase_after_stop_is_not_a_new_sentence() -> None:
    assert split_sentences('"Lord! what a boat it is!" taking a last look.') == [
        '"Lord! what a boat it is!" taking a last look.'
    ]


def test_build_items_deterministic_and_labels_vary() -> None:
    docs = [prose(1, 120), prose(2, 80)]
    a, b = build_items(docs, SMALL), build_items(docs, SMALL)
    assert a == b and len(a) == SMALL.n_items
    assert len({it["label"] for it in a}) > 1
    other = build_items(docs, NextSentenceSpec(**{**SMALL.__dict__, "seed": 4}))
    assert other != a


def test_true_choice_follows_the_context_and_distractors_fit() -> None:
    docs = [prose(1, 120), prose(2, 80)]
    sents = [split_sentences(d) for d in docs]
    for it in build_items(docs, SMALL):
        choices, label = it["choices"], it["label"]
        assert len(choices) == SMALL.n_choices and len(set(choices)) == SMALL.n_choices
        true = choices[label]
        d, i = (int(x) for x in it["where"].split()[1::2])
        assert sents[d][i] == true
        assert " ".join(sents[d][i - SMALL.context_sentences : i]) == it["context"]
        for j, c in enumerate(choices):
            if j != label:
                assert c != true
                assert len(true) / SMALL.length_ratio <= len(c) <= len(true) * SMALL.length_ratio


def test_too_little_text_is_a_data_error() -> None:
    with pytest.raises(DataError, match="give more held-out text"):
        build_items([prose(1, 15)], SMALL)
    with pytest.raises(DataError, match="needs 20 items"):
        build_items(["all in lowercase. so one long sentence. " * 50], SMALL)


def test_bad_spec_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="n_choices"):
        build_items([prose(1, 120)], NextSentenceSpec(n_choices=1))


def test_write_task_loads_in_lm_eval(tmp_path) -> None:
    TaskManager = pytest.importorskip("lm_eval.tasks").TaskManager

    items = build_items([prose(1, 120)], SMALL)
    folder = write_task(items, tmp_path / "task")
    assert json.loads((folder / "items.jsonl").read_text().splitlines()[0]) == items[0]
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    assert manager.all_tasks == [TASK_NAME]
    task = manager.load([TASK_NAME])["tasks"][TASK_NAME]
    docs = list(task.test_docs())
    assert len(docs) == len(items)
    for doc, it in zip(docs, items, strict=True):
        assert task.doc_to_text(doc) == it["context"]
        assert task.doc_to_choice(doc) == it["choices"]
        assert task.doc_to_target(doc) == it["label"]


def test_build_task_reuses_its_folder(tmp_path) -> None:
    docs = [prose(1, 120)]
    a = build_task(docs, tmp_path, SMALL)
    stamp = (a / "items.jsonl").stat().st_mtime_ns
    assert build_task(docs, tmp_path, SMALL) == a
    assert (a / "items.jsonl").stat().st_mtime_ns == stamp
    assert build_task([prose(2, 120)], tmp_path, SMALL) != a
