"""The CLI as the one front door: every config field is a flag with its doc as help, the flags
land in the config, and ``serve`` / ``worker`` start the app and the worker."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from efficientllm.cli import app
from efficientllm.cli import train as train_cmd
from efficientllm.cli.flags import ALIASES, run_config_flags
from efficientllm.config import RunConfig, field_docs

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _all_paths() -> list[str]:
    out = []
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(f.default_factory):
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory)]
        else:
            out.append(f.name)
    return out


def test_every_config_field_is_a_flag_with_its_doc() -> None:
    flags = {f.path: f for f in run_config_flags()}
    assert sorted(flags) == sorted(_all_paths())
    for path, flag in flags.items():
        section, _, name = path.rpartition(".")
        cls = type(getattr(RunConfig(), section)) if section else RunConfig
        doc = " ".join(field_docs(cls)[name].split())
        assert flag.option.help.startswith(doc), path
        given = (flag.option.default, *flag.option.param_decls)  # Annotated: 1st decl = default
        decls = [d for decl in given for d in decl.split("/")]
        assert "--" + path.replace("_", "-") in decls, (path, decls)
        assert set(ALIASES.get(path, ())) <= set(decls), (path, decls)


def test_run_flags_reach_the_config(monkeypatch, tmp_path) -> None:
    seen = {}

    class FakeTrainer:  # the flag -> config mapping is under test, not training
        def __init__(self, cfg, sink=None):
            seen["cfg"] = cfg

        def run(self):
            return type(
                "R", (), {"status": "finished", "step": 0, "params": 1, "export_path": None}
            )()

    monkeypatch.setattr("efficientllm.training.trainer.Trainer", FakeTrainer)
    args = [
        "run", "--preset", "tiny-debug", "-m", "org/model", "-d", "a.txt", "-d", "b.txt",
        "--budget", "40%", "--train.lr", "1e-4", "--total-tokens", "4096",
        "--budget.granularity", "uniform", "--budget.kinds", "ffn", "--budget.kinds", "hidden",
        "--distill.dtype", "float32", "--model.dtype", "bfloat16", "--no-deterministic",
        "--trajectory", "linear", "-o", str(tmp_path / "r"), "--quiet",
    ]  # fmt: skip
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert cfg.model.source == "org/model" and cfg.data.train == ["a.txt", "b.txt"]
    assert cfg.budget.target == "40%" and cfg.budget.granularity == "uniform"
    assert cfg.budget.kinds == ["ffn", "hidden"]
    assert cfg.train.lr == 1e-4 and cfg.train.total_tokens == 4096
    assert cfg.train.deterministic is False and cfg.schedule.trajectory == "linear"
    assert cfg.distill.dtype == "float32" and cfg.model.dtype == "bfloat16"
    assert cfg.out_dir == str(tmp_path / "r")
    assert type(cfg.budget.granularity) is str  # plain strings, not the CLI's Enum members


def test_run_rejects_a_bad_choice_with_the_choices() -> None:
    res = runner.invoke(app, ["run", "--budget.granularity", "diagonal"])
    assert res.exit_code == 2
    assert "global" in res.output and "uniform" in res.output
    assert train_cmd.FLAGS  # generated once, at import


def test_worker_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "efficientllm.cli", "worker", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Celery worker" in out.stdout and "REDIS_URL" in out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_serve_serves_the_app(tmp_path) -> None:
    pytest.importorskip("gradio")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["EFFICIENTLLM_DATA"] = str(tmp_path / "data")
    proc = subprocess.Popen(
        [sys.executable, "-m", "efficientllm.cli", "serve", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline, body = time.monotonic() + 180, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    body = r.read().decode("utf-8", "replace")
                    break
            except OSError:
                time.sleep(1)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert "gradio" in body.lower()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
