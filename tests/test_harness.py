"""lm-eval harness path: EfficientLM's log-likelihoods against hand computations from the logits
(vanilla and heterogeneous tiny models), batch invariance, run_tasks accuracy against a hand
argmax over the same items, exports that reload to identical numbers, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_mctask import prose
from test_modeling import hetero_model
from tiny import save_tiny_source, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from efficientllm.cli import app

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[eval]'")

from efficientllm.errors import ConfigError
from efficientllm.evaluation.harness import PAPER_TASKS, EfficientLM, evaluate_offline, run_tasks
from efficientllm.evaluation.mctask import TASK_NAME, NextSentenceSpec, build_task

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

SPEC = NextSentenceSpec(
    n_items=16, context_sentences=2, max_chars=90, max_context_chars=180, min_distance=8, seed=1
)
PAIRS = [  # the first three share a context (a multiple-choice question), the rest do not
    ("She walked to the garden.", " The letter was quiet."),
    ("She walked to the garden.", " It was evening and the house was quiet."),
    ("She walked to the garden.", " A"),
    ("the sister had a letter", " from town"),
    ("Nor of the weather", " but said nothing of the visit for a week."),
    ("x", " y"),
]


class Req:
    """What lm-eval hands a model: an object with ``.args``."""

    def __init__(self, *args: object) -> None:
        self.args = args


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["vanilla", "hetero"])
def model(request):
    if request.param == "vanilla":
        return tiny_model("llama_mha")  # a plain LlamaForCausalLM
    return hetero_model()  # EfficientLLMForCausalLM, per-layer widths, hidden 40


def ref_loglik(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log_softmax at the continuation positions of one unbatched forward pass."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].double()
    logp = F.log_softmax(logits[len(ctx) - 1 : len(whole) - 1], dim=-1)
    target = torch.tensor(cont)
    total = float(logp.gather(-1, target[:, None]).sum())
    return total, bool((logp.argmax(-1) == target).all())


def test_loglikelihood_matches_hand_computation(model, tok) -> None:
    lm = EfficientLM(model=model, tokenizer=tok, batch_size=4)
    got = lm.loglikelihood([Req(*p) for p in PAIRS], disable_tqdm=True)
    for (score, greedy), pair in zip(got, PAIRS, strict=True):
        ref, ref_greedy = ref_loglik(model, tok, *pair)
        assert score == pytest.approx(ref, abs=1e-4), pair
        assert greedy == ref_greedy
    assert lm.max_length == model.config.max_position_embeddings


def test_batch_size_and_prefix_sharing_do_not_change_numbers(model, tok) -> None:
    reqs = [Req(*p) for p in PAIRS * 2]
    runs = [
        EfficientLM(model=model, tokenizer=tok, batch_size=bs, share_prefix=share).loglikelihood(
            reqs, disable_tqdm=True
        )
        for bs in (1, 8)
        for share in (True, False)
    ]
    for run in runs[1:]:
        for (a, ga), (b, gb) in zip(runs[0], run, strict=True):
            assert abs(a - b) <= 1e-5 and ga == gb


def test_left_truncation_to_max_length(tok) -> None:
    model = tiny_model("llama_gqa_tied")
    context, cont = prose(5, 6), " The garden was quiet."
    lm = EfficientLM(model=model, tokenizer=tok, max_length=24)
    (score, _), _ = lm.loglikelihood([Req(context, cont), Req("x", " y")], disable_tqdm=True)
    ctx, whole = tok(context)["input_ids"], tok(context + cont)["input_ids"]
    n = len(whole) - len(ctx)
    assert len(whole) > 25
    ids = torch.tensor([whole[-25:-1]])  # the last max_length model inputs
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0, -n:].double(), -1)
    ref = float(logp.gather(-1, torch.tensor(whole[-n:])[:, None]).sum())
    assert score == pytest.approx(ref, abs=1e-4)


def test_loglikelihood_rolling(tok) -> None:
    model = tiny_model("llama_gqa_tied")
    text = prose(6, 3)
    ids = tok(text)["input_ids"]
    whole = [tok.bos_token_id, *ids]
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0].double(), -1)
    ref = float(logp.gather(-1, torch.tensor(ids)[:, None]).sum())
    long = EfficientLM(model=model, tokenizer=tok)  # max_length 128: one window
    assert len(whole) <= 128
    assert long.loglikelihood_rolling([Req(text)], disable_tqdm=True)[0] == pytest.approx(
        ref, abs=1e-4
    )
    # windows of 8: every token scored once, predicted from the 8 inputs ending just before
    # its window's last token (the last window reaches back for a full context)
    short = EfficientLM(model=model, tokenizer=tok, max_length=8)
    total, start_tok = 0.0, 0
    with torch.no_grad():
        while start_tok < len(ids):
            end = min(start_tok + 8, len(ids))  # predicts ids[start_tok:end] = whole[.. + 1]
            first = max(0, end - 8)
            logits = model(input_ids=torch.tensor([whole[first:end]])).logits[0].double()
            logp = F.log_softmax(logits[start_tok - first :], -1)
            total += float(logp.gather(-1, torch.tensor(ids[start_tok:end])[:, None]).sum())
            start_tok = end
    assert len(ids) % 8 != 0  # a partial last window
    got = short.loglikelihood_rolling([Req(text), Req(text[:20])], disable_tqdm=True)
    assert got[0] == pytest.approx(total, abs=1e-4)


def test_generate_until_is_greedy_and_stops(tok) -> None:
    model = tiny_model("llama_gqa_tied")
    lm = EfficientLM(model=model, tokenizer=tok)
    context = "She walked to the"
    ids = tok(context)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    ref = tok.decode(new, skip_special_tokens=True)
    out = lm.generate_until([Req(context, {"until": ["\u0000"], "max_gen_toks": 6})])
    assert out == [ref]
    stop = ref[len(ref) // 2 : len(ref) // 2 + 1] if ref.strip() else "\u0000"
    cut = lm.generate_until([Req(context, {"until": [stop], "max_gen_toks": 6})])[0]
    assert cut == ref.split(stop)[0]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return build_task([prose(11, 90), prose(12, 60)], tmp_path_factory.mktemp("tasks"), SPEC)


def hand_accuracy(model, tok, folder: Path) -> tuple[float, float]:
    """acc and acc_norm from hand log-likelihoods: argmax over the choices of each item."""
    items = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()]
    acc = norm = 0
    for it in items:
        lls = [ref_loglik(model, tok, it["context"], " " + c)[0] for c in it["choices"]]
        acc += max(range(len(lls)), key=lambda j: (lls[j], -j)) == it["label"]
        normed = [ll / len(c) for ll, c in zip(lls, it["choices"], strict=True)]
        norm += max(range(len(lls)), key=lambda j: (normed[j], -j)) == it["label"]
    return acc / len(items), norm / len(items)


def test_run_tasks_equals_hand_argmax(model, tok, task_dir) -> None:
    res = run_tasks(model, tok, [TASK_NAME], include_path=task_dir, batch_size=4)
    r = res[TASK_NAME]
    assert r["n"] == SPEC.n_items and r["num_fewshot"] == 0
    acc, acc_norm = hand_accuracy(model, tok, task_dir)
    assert r["acc"] == pytest.approx(acc, abs=1e-9)
    assert r["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)
    assert r["acc_stderr"] > 0 and r["lm_eval_version"].startswith("0.4")
    limited = run_tasks(model, tok, [TASK_NAME], include_path=task_dir, limit=5)
    assert limited[TASK_NAME]["n"] == 5


def test_run_tasks_restores_rng_and_training_mode(tok, task_dir) -> None:
    model = tiny_model("llama_gqa_tied").train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_tasks(model, tok, [TASK_NAME], include_path=task_dir, limit=2)
    assert torch.equal(torch.rand(3), expected) and model.training


def test_export_reload_gives_identical_numbers(tok, tmp_path) -> None:
    from efficientllm.evaluation.perplexity import perplexity
    from efficientllm.export import export_model
    from efficientllm.model_io import load_model, load_tokenizer
    from efficientllm.training.data import Document, tokenize_documents

    docs = [prose(11, 90), prose(12, 60)]
    model = hetero_model()
    out = export_model(model, tmp_path / "exp", tokenizer=tok, fmt="efficientllm").path
    loaded, loaded_tok = load_model(out), load_tokenizer(out)
    numbers = []
    for m, t in ((model, tok), (loaded, loaded_tok)):
        stream = tokenize_documents([Document("d", d) for d in docs], t, add_bos=False)
        ppl = perplexity(m, stream, block_len=64, max_tokens=512).ppl
        res = evaluate_offline(m, t, docs, cache_root=tmp_path / "tasks", spec=SPEC)
        numbers.append((ppl, res["acc"], res["acc_norm"], res["n"]))
    assert numbers[0] == numbers[1]


def test_unknown_task_is_a_clear_error(tok, task_dir) -> None:
    with pytest.raises(ConfigError) as err:
        run_tasks(tiny_model("llama_mha"), tok, ["no_such_task"], include_path=task_dir)
    msg = str(err.value)
    assert "no_such_task" in msg and TASK_NAME in msg and all(t in msg for t in PAPER_TASKS)


def test_registered_as_lm_eval_model(cli_source, task_dir) -> None:
    """``lm_eval --model efficientllm --model_args pretrained=<folder>``, in process."""
    import lm_eval
    from lm_eval.api.registry import get_model, model_registry
    from lm_eval.tasks import TaskManager

    from efficientllm.model_io import load_model, load_tokenizer

    assert get_model("efficientllm") is EfficientLM and "hf" in model_registry
    src, _ = cli_source
    out = lm_eval.simple_evaluate(
        model="efficientllm",
        model_args=f"pretrained={src},max_length=96",
        tasks=[TASK_NAME],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size="auto",
        device="cpu",
        limit=6,
        log_samples=False,
    )
    assert out["n-samples"][TASK_NAME]["effective"] == 6
    model, tok = load_model(src), load_tokenizer(src)
    ref = run_tasks(model, tok, [TASK_NAME], include_path=task_dir, limit=6, max_length=96)
    assert out["results"][TASK_NAME]["acc,none"] == ref[TASK_NAME]["acc"]


# ---- CLI -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_source(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cli-eval")
    text = d / "heldout.txt"
    text.write_text(prose(21, 140), encoding="utf-8")
    return save_tiny_source(d / "src", "llama_gqa_tied"), text


def _eval(src: Path, text: Path, cache: Path, *extra: str):
    args = ["eval", "--model", str(src), "--data", str(text), "--block-len", "32"]
    args += ["--max-tokens", "256", "--task-cache", str(cache), *extra]
    return runner.invoke(app, args)


def test_cli_eval_prints_perplexity_and_accuracy(cli_source, tmp_path) -> None:
    src, text = cli_source
    res = _eval(src, text, tmp_path, "--mc-items", "12")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("perplexity ") and "block 32" in lines[0]
    assert lines[1].startswith(f"{TASK_NAME}: acc ")
    assert "(12 items, 0-shot, lm-eval 0.4" in lines[1]
    report = json.loads(lines[-1])
    assert report["perplexity"]["block_len"] == 32
    r = report["tasks"][TASK_NAME]
    assert r["n"] == 12 and 0 <= r["acc"] <= 1
    assert f"acc {r['acc']:.4f}" in lines[1]
    res = _eval(src, text, tmp_path, "--mc-items", "12", "--limit", "5")
    assert json.loads(res.stdout.splitlines()[-1])["tasks"][TASK_NAME]["n"] == 5
    res = _eval(src, text, tmp_path, "--tasks", "none")
    assert res.exit_code == 0 and json.loads(res.stdout.splitlines()[-1])["tasks"] == {}


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
        (["--tasks", TASK_NAME, "--mc-items", "5000"], "needs 5000 items"),
    ],
)
def test_cli_eval_errors_are_one_line(cli_source, tmp_path, extra, needle) -> None:
    src, text = cli_source
    res = _eval(src, text, tmp_path, *extra)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.output
    assert "Traceback" not in res.output


def test_cli_eval_default_task_skipped_with_a_note_on_short_text(cli_source, tmp_path) -> None:
    src, _ = cli_source
    short = tmp_path / "short.txt"
    short.write_text(prose(3, 20), encoding="utf-8")
    res = _eval(src, short, tmp_path)
    assert res.exit_code == 0, res.output
    assert f"note: {TASK_NAME} skipped" in res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["tasks"] == {}


def test_missing_lm_eval_is_one_clear_line(cli_source, tmp_path) -> None:
    src, text = cli_source
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "from efficientllm.cli import main\n"
        f"sys.argv = ['efficientllm', 'eval', '--model', {str(src)!r}, '--data', {str(text)!r},"
        f" '--task-cache', {str(tmp_path)!r}, '--mc-items', '12']\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    hint = "lm-eval is not installed: pip install 'efficientllm[eval]'"
    assert proc.stderr.strip() == f"error: {hint}"


# ---- the real demo model ---------------------------------------------------------------------
@pytest.mark.real
def test_demo_model_eval_equal_after_export(demo_model_dir, austen, tmp_path) -> None:
    """SmolLM2-135M on Persuasion: perplexity and next_sentence accuracy, then the same numbers
    from its export (efficientllm format) after reload."""
    from efficientllm.assets import DEMO_HELDOUT_BOOK
    from efficientllm.export import export_model
    from efficientllm.model_io import load_model, load_tokenizer

    export_model(
        load_model(demo_model_dir),
        tmp_path / "export",
        tokenizer=load_tokenizer(demo_model_dir),
        fmt="efficientllm",
    )
    reports = []
    for folder in (demo_model_dir, tmp_path / "export"):
        res = runner.invoke(
            app,
            [
                "eval",
                "--model",
                str(folder),
                "--data",
                str(austen[DEMO_HELDOUT_BOOK]),
                "--max-tokens",
                "2048",
                "--mc-items",
                "40",
                "--batch-size",
                "8",
                "--task-cache",
                str(tmp_path / "tasks"),
            ],
        )
        assert res.exit_code == 0, res.output
        lines = res.stdout.strip().splitlines()
        print(*lines[:2], sep="\n")
        assert lines[1].startswith(f"{TASK_NAME}: acc ") and "(40 items" in lines[1]
        reports.append(json.loads(lines[-1]))
    src, exp = reports
    assert exp["perplexity"]["ppl"] == pytest.approx(src["perplexity"]["ppl"], rel=1e-4)
    assert 5 < src["perplexity"]["ppl"] < 100
    for key in ("acc", "acc_norm", "n"):
        assert exp["tasks"][TASK_NAME][key] == src["tasks"][TASK_NAME][key]
    assert src["tasks"][TASK_NAME]["n"] == 40
