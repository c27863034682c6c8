"""Reading, validation, splitting, tokenising, packing and resumable sampling of text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from efficientllm.errors import ConfigError, DataError
from efficientllm.training.data import (
    BlockSampler,
    Document,
    load_hub_dataset,
    pack_blocks,
    read_documents,
    split_documents,
    tokenize_documents,
)

WORDS = ["the", "a", "of", "house", "sister", "letter", "walk", "dance", "ball", "said", "very"]


def fake_text(seed: int, n_paragraphs: int = 6) -> str:
    rng = random.Random(seed)
    paras = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))).capitalize() + "."
        for _ in range(n_paragraphs)
    ]
    return "\n\n".join(paras) + "\n"


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[Document]]:
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    docs = []
    for i, rel in enumerate(["b.txt", "a.txt", "sub/c.md"]):
        text = fake_text(i)
        (folder / rel).write_text(text, encoding="utf-8")
        docs.append(Document(rel, text))
    (folder / "notes.bin").write_bytes(b"\x00\x01")  # ignored suffix
    return folder, sorted(docs, key=lambda d: d.name)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([fake_text(s) for s in range(30)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


# ---- reading ---------------------------------------------------------------------------------


def test_folder_recursive_sorted(corpus):
    folder, expected = corpus
    docs = read_documents([folder])
    assert docs == expected
    assert [d.name for d in docs] == ["a.txt", "b.txt", "sub/c.md"]
    assert read_documents([str(folder)]) == docs  # str paths too, deterministic


def test_jsonl_and_parquet_match_txt(corpus, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder, _ = corpus
    txt_texts = [d.text for d in read_documents([folder])]
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(txt_texts)))
    pq_path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": txt_texts}), pq_path)
    from_jsonl = read_documents([jl], text_field="body")
    from_parquet = read_documents([pq_path], text_field="body")
    assert [d.text for d in from_jsonl] == txt_texts
    assert [d.text for d in from_parquet] == txt_texts
    assert len({d.name for d in from_jsonl + from_parquet}) == 2 * len(txt_texts)


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"  \n\n ", "empty"),
        ("model.txt", b"\x00\x00\x10\x00safetensors" + bytes(range(256)) * 8, "binary"),
        ("ctrl.txt", bytes([1, 2, 3, 4, 5, 6, 7, 65]) * 100, "binary"),
        ("latin1.txt", "caf\u00e9 au lait".encode("latin-1"), "UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{not json}\n', "line 2 is not valid JSON"),
        ("nofield.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "line 2 has no field 'text'"),
        ("notstr.jsonl", b'{"text": 5}\n', "not a string"),
    ],
)
def test_bad_files_raise_with_file_name(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_documents([path])
    msg = str(info.value)
    assert name in msg and needle in msg and "\n" not in msg


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere.txt.*no such file"):
        read_documents([tmp_path / "nowhere.txt"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir.*no .* files"):
        read_documents([tmp_path / "empty_dir"])
    with pytest.raises(DataError):
        read_documents([])


def test_all_files_validated_before_returning(corpus):
    folder, _ = corpus
    (folder / "zz_bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(DataError, match="zz_bad.txt"):
        read_documents([folder])


def test_parquet_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["x"]}), path)
    with pytest.raises(DataError, match="t.parquet.*no column 'text'"):
        read_documents([path])


def test_hub_dataset_error_path():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="local text files"):
            load_hub_dataset("someone/some-dataset")
    else:  # installed: the hub is unreachable here and must still give a DataError
        with pytest.raises(DataError, match="local text files"):
            load_hub_dataset("someone/surely-not-a-dataset-xyz", max_documents=1)


# ---- splitting -------------------------------------------------------------------------------

DOCS = [Document(f"book{i}.txt", fake_text(i)) for i in range(10)]


def test_split_by_names():
    train, held = split_documents(DOCS, heldout=["book3", "book7.txt"], seed=0)
    assert [d.name for d in held] == ["book3.txt", "book7.txt"]
    assert {d.name for d in train} == {d.name for d in DOCS} - {"book3.txt", "book7.txt"}
    with pytest.raises(DataError, match="not found: nope"):
        split_documents(DOCS, heldout=["nope"], seed=0)
    with pytest.raises(DataError, match="each side"):
        split_documents(DOCS, heldout=[d.name for d in DOCS], seed=0)


@pytest.mark.parametrize("frac", [0.01, 0.2, 0.5, 0.99])
def test_split_by_fraction_disjoint_and_deterministic(frac):
    train, held = split_documents(DOCS, heldout=frac, seed=1)
    assert not {d.name for d in train} & {d.name for d in held}
    assert len(train) + len(held) == len(DOCS) and train and held
    assert split_documents(DOCS, heldout=frac, seed=1) == (train, held)
    if frac == 0.2:
        assert len(held) == 2
        others = {
            tuple(d.name for d in split_documents(DOCS, heldout=frac, seed=s)[1]) for s in range(10)
        }
        assert len(others) > 1  # the seed matters


def test_split_single_document_by_paragraph_chunks():
    doc = Document("emma.txt", fake_text(0, n_paragraphs=40))
    train, held = split_documents([doc], heldout=0.2, seed=0)
    assert len(train) == 8 and len(held) == 2
    assert not {d.name for d in train} & {d.name for d in held}
    chunks = sorted(train + held, key=lambda d: int(d.name.split("#")[1]))
    assert "\n\n".join(c.text for c in chunks).strip() == doc.text.strip()  # contiguous, complete
    with pytest.raises(DataError, match="two or more .* paragraphs"):
        split_documents([Document("one.txt", "a single line")], heldout=0.5, seed=0)
    with pytest.raises(ConfigError):
        split_documents(DOCS, heldout=1.5, seed=0)


# ---- tokenising, packing, sampling -----------------------------------------------------------


def test_tokenize_bos_eos_explicit(tokenizer):
    docs = DOCS[:3]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    plain = [tokenizer.encode(d.text, add_special_tokens=False) for d in docs]
    stream = tokenize_documents(docs, tokenizer, add_bos=True)
    assert stream.dtype == torch.long and stream.dim() == 1
    expected = [bos, *plain[0], eos, bos, *plain[1], eos, bos, *plain[2]]
    assert stream.tolist() == expected
    no_bos = tokenize_documents(docs, tokenizer, add_bos=False, eos_between=False)
    assert no_bos.tolist() == plain[0] + plain[1] + plain[2]
    assert tokenizer.decode(plain[0]) == docs[0].text  # byte-level round trip


def test_pack_blocks_shape():
    stream = torch.arange(103)
    blocks = pack_blocks(stream, 10)
    assert blocks.shape == (10, 10) and blocks.dtype == stream.dtype
    assert torch.equal(blocks.flatten(), stream[:100])
    with pytest.raises(DataError, match="fewer than one block"):
        pack_blocks(torch.arange(5), 10)


def test_block_sampler_deterministic_and_epochs():
    blocks = pack_blocks(torch.arange(13 * 4), 4)  # 13 blocks, 3 batches of 4 per epoch
    a = BlockSampler(blocks, batch_size=4, seed=7)
    b = BlockSampler(blocks, batch_size=4, seed=7)
    seen = []
    for _ in range(3):
        batch = next(a)
        assert batch.shape == (4, 4) and torch.equal(batch, next(b))
        seen += a.last_indices
    assert len(set(seen)) == 12  # no block repeats within an epoch
    next(a)
    assert a.state_dict()["epoch"] == 1 and a.state_dict()["position"] == 4
    c = BlockSampler(blocks, batch_size=4, seed=8)
    assert not torch.equal(next(c), next(BlockSampler(blocks, batch_size=4, seed=7)))


def test_block_sampler_resume_mid_epoch():
    blocks = pack_blocks(torch.arange(11 * 8), 8)
    ref = BlockSampler(blocks, batch_size=3, seed=123)
    for _ in range(4):  # stop mid-epoch of the second epoch (3 batches per epoch)
        next(ref)
    state = json.loads(json.dumps(ref.state_dict()))
    resumed = BlockSampler(blocks, batch_size=3, seed=123)
    resumed.load_state_dict(state)
    for _ in range(10):
        assert torch.equal(next(ref), next(resumed))
        assert ref.last_indices == resumed.last_indices
    with pytest.raises(ConfigError, match="seed"):
        BlockSampler(blocks, batch_size=3, seed=5).load_state_dict(state)
    with pytest.raises(ConfigError):
        BlockSampler(blocks, batch_size=12, seed=5)


def test_split_by_file_name_selects_all_its_records(tmp_path):
    for name, seed in [("train.jsonl", 0), ("val.jsonl", 10)]:
        lines = [json.dumps({"text": fake_text(seed + i)}) for i in range(3)]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    docs = read_documents([tmp_path])
    train, held = split_documents(docs, heldout=["val.jsonl"], seed=0)
    assert [d.name for d in held] == ["val.jsonl:1", "val.jsonl:2", "val.jsonl:3"]
    assert [d.name for d in train] == ["train.jsonl:1", "train.jsonl:2", "train.jsonl:3"]
