"""The CLI as a user meets it: plan, prune-oneshot, run, eval; bad input gets one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import save_tiny_corpus, save_tiny_source
from typer.testing import CliRunner

from efficientllm.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _data_args(docs) -> list[str]:
    return [a for d in docs for a in ("--data", str(d))]


def _invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    src = save_tiny_source(d / "src", "llama_gqa_tied")
    docs = save_tiny_corpus(d / "corpus")
    return src, docs


def test_help_explains_every_command() -> None:
    res = _invoke("--help")
    for cmd in ("plan", "prune-oneshot", "run", "eval", "demo-model", "demo-data"):
        assert cmd in res.output
    res = _invoke("plan", "--help")
    assert "67M" in res.output and "uniform" in res.output


def test_plan_json_on_tiny(tiny) -> None:
    src, _ = tiny
    res = _invoke(
        "plan",
        "--model",
        str(src),
        "--budget",
        "70%",
        "--json",
        "--hidden-multiple",
        "1",
        "--ffn-multiple",
        "1",
    )
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["num_params"] <= plan["budget"]
    assert plan["source_params"] == 44112


def _bad(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    no_type = tmp_path / "gpt2"
    no_type.mkdir()
    (no_type / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(
        json.dumps({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "evil.Model"}})
    )
    return {
        "missing": (["--model", str(tmp_path / "nope")], "not found"),
        "unsupported": (["--model", str(no_type)], "not supported"),
        "auto_map": (["--model", str(remote)], "custom code"),
        "bad hub id": (["--model", "a/b/c..d"], "not found"),
    }


@pytest.mark.parametrize("case", ["missing", "unsupported", "auto_map", "bad hub id"])
def test_bad_model_is_one_clear_line(tiny, tmp_path, case) -> None:
    args, needle = _bad(tmp_path)[case]
    _, docs = tiny
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["prune-oneshot", *args, "--data", str(docs[0]), "--budget", "50%", "--out", str(out)]
    )
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.output
    assert "Traceback" not in res.output and not out.exists()


@pytest.mark.parametrize(
    "budget,needle",
    [("1B", "not below the source"), ("100", "smallest legal shape"), ("lots", "not understood")],
)
def test_bad_budget(tiny, tmp_path, budget, needle) -> None:
    src, docs = tiny
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "prune-oneshot",
            "--model",
            str(src),
            "--data",
            str(docs[0]),
            "--budget",
            budget,
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 2 and needle in res.output and not out.exists(), res.output
    res = runner.invoke(app, ["plan", "--model", str(src), "--budget", budget])
    assert res.exit_code == 2 and needle in res.output


def test_binary_data_file(tiny, tmp_path) -> None:
    src, _ = tiny
    blob = tmp_path / "weights.txt"
    blob.write_bytes(b"\x00\x01\x02" * 1000)
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "prune-oneshot",
            "--model",
            str(src),
            "--data",
            str(blob),
            "--budget",
            "50%",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 2 and "weights.txt" in res.output and not out.exists(), res.output


def test_prune_oneshot_tiny_exports_and_reloads(tiny, tmp_path) -> None:
    src, docs = tiny
    out = tmp_path / "pruned"
    res = runner.invoke(
        app,
        [
            "prune-oneshot",
            "--model",
            str(src),
            *_data_args(docs),
            "--budget",
            "60%",
            "--out",
            str(out),
            "--block-len",
            "32",
            "--calib-batches",
            "2",
            "--eval-tokens",
            "256",
            "--hidden-multiple",
            "1",
            "--ffn-multiple",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{") :])
    assert report["params"] <= report["budget"]
    assert report["perplexity_before"] > 1 and report["perplexity_after"] > 1
    from efficientllm.export import load_exported

    model = load_exported(out)
    assert sum(p.numel() for p in model.parameters()) == report["params"]
    assert (out / "oneshot_report.json").exists() and (out / "tokenizer.json").exists()


def test_run_and_eval_cli(tiny, tmp_path) -> None:
    src, docs = tiny
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "run",
            "--preset",
            "tiny-debug",
            "--model",
            str(src),
            *_data_args(docs),
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (out / "events.jsonl").exists() and (out / "export" / "config.json").exists()
    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(out / "export"),
            "--data",
            str(docs[0]),
            "--block-len",
            "32",
            "--max-tokens",
            "256",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.output and "block 32" in res.output


@pytest.mark.real
def test_demo_model_plan_67m_json(demo_model_dir) -> None:
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "efficientllm.cli",
            "plan",
            "--model",
            str(demo_model_dir),
            "--budget",
            "67M",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert 67_000_000 * 0.995 <= plan["num_params"] <= 67_000_000
    assert plan["source_params"] == 134_515_008
    assert time.time() - t0 < 60


@pytest.mark.real
def test_demo_model_prune_oneshot_austen(demo_model_dir, austen, tmp_path) -> None:
    """SmolLM2-135M one-shot pruned to 67M on Austen: exports, reloads, perplexities printed."""
    from efficientllm.assets import DEMO_HELDOUT_BOOK

    train = [str(p) for t, p in austen.items() if t != DEMO_HELDOUT_BOOK][:1]
    out = tmp_path / "pruned"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "efficientllm.cli",
            "prune-oneshot",
            "--model",
            str(demo_model_dir),
            "--data",
            train[0],
            "--heldout",
            str(austen[DEMO_HELDOUT_BOOK]),
            "--budget",
            "67M",
            "--out",
            str(out),
            "--calib-batches",
            "2",
            "--eval-tokens",
            "2048",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert 67_000_000 * 0.995 <= report["params"] <= 67_000_000
    assert report["perplexity_before"] < report["perplexity_after"]
    assert "perplexity" in proc.stderr
    from efficientllm.export import load_exported

    model = load_exported(out)
    assert sum(p.numel() for p in model.parameters()) == report["params"]


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "wrong shapes"])
def test_damaged_weights_are_one_clear_line(tiny, tmp_path, damage) -> None:
    import shutil

    src, docs = tiny
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    weights = bad / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage header":
        weights.write_bytes(b"\xff" * 8 + b"{not json" + b"\x00" * 100)
    else:  # a valid file whose tensors do not fit config.json
        from safetensors.torch import load_file, save_file

        t = load_file(weights)
        t = {k: v[..., :-1].contiguous() if v.dim() == 2 else v for k, v in t.items()}
        save_file(t, weights)
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "prune-oneshot",
            "--model",
            str(bad),
            "--data",
            str(docs[0]),
            "--budget",
            "50%",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 2, res.output
    last = [ln for ln in res.output.splitlines() if ln.strip()][-1]
    assert last.startswith("error: could not load the weights"), res.output
    assert "Traceback" not in res.output and not out.exists()
