"""The new-job form: widget values <-> RunConfig dict, and invalid input -> messages."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio")

from app import forms  # noqa: E402
from app.guard import GENERIC, guarded  # noqa: E402
from efficientllm.config import RunConfig, field_docs  # noqa: E402
from efficientllm.errors import (  # noqa: E402
    BudgetInfeasibleError,
    ConfigError,
    DataError,
    ModelNotFoundError,
)
from efficientllm.shape import ModelShape  # noqa: E402


@pytest.fixture
def tiny_source(tmp_path: Path) -> Path:
    from tiny import save_tiny_source

    return save_tiny_source(tmp_path / "src")


ADVANCED_VALUES = {
    "start_fraction": 0.1, "trajectory": "cubic", "lr_schedule": "continuous",
    "saliency_mode": "ema", "saliency_beta": 0.95, "distill_weight": 0.5,
    "distill_temperature": 2.0, "distill_phases": "recovery", "distill_teacher": "org/teacher",
    "gguf": "f16",
}  # fmt: skip
"""A non-default value for every Advanced widget."""


def values(**kw: object) -> forms.FormValues:
    base = {"preset": "tiny-debug", "model": "demo", "budget": "60%", "dataset": "demo:austen"}
    return forms.FormValues(**{**base, **kw})  # type: ignore[arg-type]


def test_widgets_map_one_to_one_to_config_fields(tmp_path: Path) -> None:
    fv = values(budget="67M", total_tokens=4096, prune_fraction=0.4, granularity="uniform",
                scorer="magnitude", dataset="hub:HuggingFaceFW/fineweb-edu",
                **ADVANCED_VALUES)  # fmt: skip
    cfg = forms.form_to_config(fv, owner="alice", data_root=tmp_path)
    got = {w: cfg[sec][key] for w, (sec, key) in forms.FIELDS.items()}
    assert got == {
        "model": "demo", "budget": "67M", "dataset": ["hub:HuggingFaceFW/fineweb-edu"],
        "total_tokens": 4096, "prune_fraction": 0.4, "granularity": "uniform",
        "scorer": "magnitude", **ADVANCED_VALUES,
    }  # fmt: skip
    assert cfg["train"]["batch_size"] == 4  # the rest comes from the preset
    back = forms.config_to_form(cfg, preset="tiny-debug", owner="alice", data_root=tmp_path)
    assert back == fv
    assert tuple(forms.FormValues.__dataclass_fields__) == forms.FIELD_ORDER


def test_upload_round_trip_stays_below_the_data_dir(tmp_path: Path) -> None:
    src = tmp_path / "my corpus.txt"
    src.write_text("hello world. " * 50, encoding="utf-8")
    ds = forms.save_upload(src, owner="bob", data_root=tmp_path / "data", max_bytes=10**6)
    assert ds.startswith("upload:") and ds.endswith("-my_corpus.txt")
    cfg = forms.form_to_config(values(dataset=ds), owner="bob", data_root=tmp_path / "data")
    path = Path(cfg["data"]["train"][0])
    assert path.parent == (tmp_path / "data" / "uploads" / "bob").resolve() and path.is_file()
    back = forms.config_to_form(cfg, preset="tiny-debug", owner="bob", data_root=tmp_path / "data")
    assert back.dataset == ds
    with pytest.raises(ConfigError, match="not found"):  # another user's upload name
        forms.form_to_config(values(dataset=ds), owner="eve", data_root=tmp_path / "data")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"budget": "lots"}, "budget.target"),
        ({"total_tokens": "many"}, "train.total_tokens: 'many' is not a number"),
        ({"dataset": "/etc/passwd"}, "choose demo:austen"),
        ({"dataset": "upload:../../x.txt"}, "not found"),
        ({"preset": "nope"}, "preset 'nope' is unknown"),
        ({"model": " "}, "model.source"),
        ({"prune_fraction": 0}, "schedule.prune_fraction"),
        ({"distill_weight": 2}, "distill.weight: 2.0 is outside [0, 1]"),
        ({"distill_temperature": None}, "distill.temperature: None is not a number"),
        ({"saliency_beta": "high"}, "saliency.beta: 'high' is not a number"),
        ({"trajectory": "quadratic"}, "schedule.trajectory: 'quadratic' is not a valid choice"),
        ({"start_fraction": 0.6}, "start_fraction + prune_fraction must be at most 1"),
    ],
)
def test_invalid_values_give_messages(tmp_path: Path, kw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        forms.form_to_config(values(**kw), owner="a", data_root=tmp_path)
    assert message in str(err.value)


def test_bad_uploads(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        forms.save_upload(empty, owner="a", data_root=tmp_path, max_bytes=100)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x04pickle")
    with pytest.raises(DataError, match=r"\.txt, \.jsonl or \.parquet"):
        forms.save_upload(evil, owner="a", data_root=tmp_path, max_bytes=100)
    big = tmp_path / "big.txt"
    big.write_text("x" * 101)
    with pytest.raises(DataError, match="upload limit"):
        forms.save_upload(big, owner="a", data_root=tmp_path, max_bytes=100)
    assert not (tmp_path / "uploads").exists()


def test_predict_exact_count_and_bad_models(tmp_path: Path, tiny_source: Path) -> None:
    cfg = forms.form_to_config(values(model=str(tiny_source)), owner="a", data_root=tmp_path)
    p = forms.predict(cfg)
    src = p.source.num_params()
    assert p.budget == int(src * 0.6) and p.num_params <= p.budget
    assert p.num_params == ModelShape.from_dict(p.shape.to_dict()).num_params()
    over = forms.form_to_config(
        values(model=str(tiny_source), budget=str(src + 1)), owner="a", data_root=tmp_path
    )
    with pytest.raises(BudgetInfeasibleError, match="not below the source"):
        forms.predict(over)
    missing = forms.form_to_config(values(model="../no/such/model"), owner="a", data_root=tmp_path)
    with pytest.raises(ModelNotFoundError, match="not found"):
        forms.predict(missing)


def test_preset_fills_the_widgets() -> None:
    fv = forms.preset_form("cpu-demo", values(model="x/y"))
    assert (fv.model, fv.budget, fv.dataset, fv.total_tokens) == (
        "demo",
        "50%",
        "demo:austen",
        65536,
    )
    assert forms.preset_form("tiny-debug", values(model="x/y")).model == "x/y"
    reset = forms.preset_form("cpu-demo", values(**ADVANCED_VALUES))
    assert all(getattr(reset, w) == getattr(forms.FormValues(), w) for w in forms.ADVANCED)


def test_advanced_defaults_are_the_config_defaults(tmp_path: Path) -> None:
    default, fv = RunConfig(), forms.FormValues()
    want = {w: getattr(getattr(default, sec), key) for w, (sec, key) in forms.ADVANCED.items()}
    assert {w: getattr(fv, w) for w in forms.ADVANCED} == want
    assert len(set(forms.ADVANCED)) == 10 and not set(ADVANCED_VALUES) ^ set(forms.ADVANCED)
    cfg = forms.form_to_config(values(), owner="a", data_root=tmp_path)
    assert {w: cfg[sec][key] for w, (sec, key) in forms.ADVANCED.items()} == want
    teacher = forms.form_to_config(values(distill_teacher=" org/t "), owner="a", data_root=tmp_path)
    assert teacher["distill"]["teacher"] == "org/t"


def test_advanced_widgets_show_defaults_choices_and_docs(tmp_path: Path) -> None:
    from app.context import AppContext
    from app.views import build

    ctx = AppContext(sessions=None, data_dir=tmp_path, users=None, max_upload_bytes=1)
    by_id = {getattr(b, "elem_id", None): b for b in build(ctx).blocks.values()}
    fv = forms.FormValues()
    for widget, (sec, key) in forms.ADVANCED.items():
        box = by_id[widget.replace("_", "-")]
        assert box.value == getattr(fv, widget), widget
        doc = field_docs(type(getattr(RunConfig(), sec)))[key]
        shown = box.info.replace("\N{ASTERISK OPERATOR}", "*")  # not Markdown emphasis
        assert shown == " ".join(doc.split()) and f"{sec}.{key}" in box.label
        if forms.config_choices(sec, key):
            assert [c[1] for c in box.choices] == forms.config_choices(sec, key)
    assert [c[1] for c in by_id["distill-phases"].choices] == ["both", "prune", "recovery"]
    assert "(1-weight)\N{ASTERISK OPERATOR}LM" in by_id["distill-weight"].info


def test_guarded_shows_messages_never_tracebacks() -> None:
    @guarded(2)
    def user_error() -> tuple[str, str]:
        raise BudgetInfeasibleError("budget 5 is below the smallest legal shape")

    @guarded(2)
    def bug() -> tuple[str, str]:
        raise KeyError("internal detail")

    assert user_error()[0] == "**Cannot do that:** budget 5 is below the smallest legal shape"
    msg = bug()[0]
    assert GENERIC in msg and "KeyError" not in msg and "internal detail" not in msg


def test_importing_the_app_loads_no_torch() -> None:
    code = (
        "import sys, app.main, app.views, app.forms, app.plots, app.downloads, app.monitor\n"
        "import app.context, app.guard, app.handlers, app.playground, db.snapshot\n"
        "import app.auth, app.login, app.model_policy\n"
        "bad = [m for m in ('torch', 'efficientllm.modeling') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ---- the model fields on a multi-user server (login on): hub ids and one models folder ----------
BAD_SOURCES = [
    "../x", "/etc", "/etc/passwd", "~", "~/models", "https://huggingface.co/gpt2",
    "http://127.0.0.1:1/x", "file:///etc", "a--b", "a..b", "org/a--b", "a\0b", "a" * 97,
    "a/b/c", "/", "", " ", ".hidden", "org/", "/org", "x.git", "C:\\models\\x",
    "\N{CYRILLIC SMALL LETTER A}bc",  # a look-alike letter: not the ASCII "abc"
]  # fmt: skip
GOOD_IDS = ["gpt2", "demo", "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B", "a" * 96,
            "org_1/name.v2-x", "meta-llama/Llama-3.2-1B"]  # fmt: skip


@pytest.mark.parametrize("source", BAD_SOURCES)
def test_model_source_rejects_paths_urls_and_bad_ids(tmp_path: Path, source: str) -> None:
    from app import model_policy

    with pytest.raises(ConfigError, match="model.source"):
        model_policy.check_source(source, models_dir=tmp_path / "models")
    assert not model_policy.is_hub_id(source)


@pytest.mark.parametrize("source", GOOD_IDS)
def test_model_source_accepts_hub_ids(tmp_path: Path, source: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    from app import model_policy

    assert model_policy.check_source(source, models_dir=tmp_path / "m") == source
    validate_repo_id(source)  # the Hub's own rule agrees


def test_model_source_folders_only_inside_the_models_dir(tmp_path: Path) -> None:
    from app import model_policy

    models = (tmp_path / "models").resolve()
    (models / "tiny").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (models / "escape").symlink_to(tmp_path / "outside")
    assert model_policy.check_source(str(models / "tiny"), models_dir=models) == str(
        models / "tiny"
    )
    assert model_policy.check_source(f"{models}/x/../tiny/", models_dir=models) == str(
        models / "tiny"
    )
    for bad, why in [
        (f"{models}/../outside", "neither"),  # ".." climbs out: refused on the string alone
        (str(models), "neither"),  # the folder itself is no model
        (f"{models}-other/tiny", "neither"),  # a sibling with the same prefix
        (str(models / "escape"), "leads outside"),  # a planted symlink
        (str(models / "missing"), "no model folder"),
    ]:
        with pytest.raises(ConfigError, match=why):
            model_policy.check_source(bad, models_dir=models)
    assert model_policy.check_source("/etc", models_dir=None) == "/etc"  # login off: unchanged


def test_form_with_login_restricts_model_teacher_and_hub_dataset(tmp_path: Path) -> None:
    models = (tmp_path / "models").resolve()
    (models / "t").mkdir(parents=True)
    kw = {"owner": "a", "data_root": tmp_path, "models_dir": models}
    with pytest.raises(ConfigError) as err:
        forms.form_to_config(
            values(model="/etc", distill_teacher="../t", dataset="hub:../../etc"), **kw
        )
    assert [p.split(":")[0] for p in err.value.problems] == [
        "data.train", "model.source", "distill.teacher"
    ]  # fmt: skip
    cfg = forms.form_to_config(
        values(model="org/m", distill_teacher=str(models / "t"), dataset="hub:org/d"), **kw
    )
    assert cfg["model"]["source"] == "org/m" and cfg["distill"]["teacher"] == str(models / "t")
    assert cfg["data"]["train"] == ["hub:org/d"]
    open_cfg = forms.form_to_config(values(model="/etc"), owner="a", data_root=tmp_path)
    assert open_cfg["model"]["source"] == "/etc"  # login off: nothing changes


@contextmanager
def fs_spy() -> Iterator[list[str]]:
    """Record every call of the os functions a path check could use (stat, links, listings)."""
    import os

    names = ("stat", "lstat", "listdir", "scandir", "readlink", "access")
    real = {n: getattr(os, n) for n in names}
    calls: list[str] = []

    def spy(name: str) -> Any:
        def inner(*a: Any, **k: Any) -> Any:
            calls.append(name)
            return real[name](*a, **k)

        return inner

    try:
        for name in names:
            setattr(os, name, spy(name))
        yield calls
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)


def test_rejected_sources_touch_no_filesystem(tmp_path: Path) -> None:
    """S4: Hypothesis over hostile strings: every answer is a valid ASCII hub id or a folder in
    the models dir, and only a path inside the models dir causes any filesystem call."""
    import posixpath

    from huggingface_hub.utils import validate_repo_id
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from app import model_policy

    models = (tmp_path / "models").resolve()
    (models / "ok").mkdir(parents=True)
    with fs_spy() as calls:  # the spy sees the check of an accepted folder
        model_policy.check_source(str(models / "ok"), models_dir=models)
    assert calls
    pieces = st.sampled_from(
        ["..", "/", "~", "-", "--", ".", "a", "Z9", "_", "\0", ":", "%2e", "\\", "http://",
         "\N{CYRILLIC SMALL LETTER A}", "\N{FULLWIDTH SOLIDUS}", str(models), "/etc", " "]
    )  # fmt: skip
    hostile = st.one_of(
        st.text(max_size=120), st.lists(pieces, max_size=8).map("".join),
        st.from_regex(r"[A-Za-z0-9_.\-/]{1,100}", fullmatch=True),
    )  # fmt: skip

    @settings(max_examples=600, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(hostile)
    def check(text: str) -> None:
        with fs_spy() as calls:
            try:
                got: str | None = model_policy.check_source(text, models_dir=models)
            except ConfigError:
                got = None
        norm = posixpath.normpath(text.strip()) if text.strip().startswith("/") else ""
        if not norm.startswith(f"{models}/"):  # not a path inside the models dir: no I/O
            assert calls == [], (text, calls)
        if got is None:
            return
        if got.startswith("/"):
            assert got.startswith(str(models) + "/") and Path(got).is_dir()
        else:
            assert got.isascii() and len(got) <= 96 and "--" not in got and ".." not in got
            validate_repo_id(got)

    check()
