"""Perplexity against hand computations on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from efficientllm.errors import ConfigError, DataError
from efficientllm.evaluation.perplexity import perplexity
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama_gqa_tied")


def make_stream(n: int, seed: int = 0, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of ids[1:] given ids[:-1], in one forward pass."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    return F.cross_entropy(logits[:-1].double(), ids[1:], reduction="none")


def test_single_window_equals_hand_computation(model):
    stream = make_stream(50)
    res = perplexity(model, stream, block_len=64)
    ref = token_nll(model, stream)
    assert res.n_tokens_scored == 49
    assert res.nll == pytest.approx(ref.mean().item(), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(ref.mean().item()), rel=1e-5)
    assert res.protocol == "block 64, stride 64, 49 tokens scored, BOS prepended: no"


def test_non_overlapping_blocks(model):
    stream = make_stream(70)
    res = perplexity(model, stream, block_len=32, batch_size=2)
    parts = [token_nll(model, stream[i : i + 32]) for i in range(0, 70, 32) if 70 - i > 1]
    ref = torch.cat(parts)
    assert res.n_tokens_scored == ref.numel() == 70 - 3  # first token of each block unscored
    assert res.nll == pytest.approx(ref.mean().item(), rel=1e-5)


def brute_force_strided(model, stream, block_len, stride):
    """The textbook loop: one window at a time, score tokens after the previous window's end."""
    total, count, prev_end = 0.0, 0, 0
    n = stream.numel()
    for begin in range(0, n, stride):
        end = min(begin + block_len, n)
        nll = token_nll(model, stream[begin:end])  # nll[j] scores global token begin + j + 1
        for j in range(nll.numel()):
            if begin + j + 1 >= prev_end:
                total += nll[j].item()
                count += 1
        prev_end = end
        if end == n:
            break
    return total / count, count


@pytest.mark.parametrize("block_len, stride, batch_size", [(32, 8, 4), (32, 31, 1), (20, 1, 16)])
def test_strided_scores_every_token_once(model, block_len, stride, batch_size):
    stream = make_stream(90, seed=1)
    res = perplexity(model, stream, block_len=block_len, stride=stride, batch_size=batch_size)
    ref_nll, ref_count = brute_force_strided(model, stream, block_len, stride)
    assert res.n_tokens_scored == ref_count == stream.numel() - 1
    assert res.nll == pytest.approx(ref_nll, rel=1e-5)
    assert res.stride == stride and res.block_len == block_len


def test_strided_lower_than_blocks(model):
    # the tiny model is random, so only the bookkeeping is compared here: batching is invisible
    stream = make_stream(120, seed=2)
    a = perplexity(model, stream, block_len=32, stride=16, batch_size=1)
    b = perplexity(model, stream, block_len=32, stride=16, batch_size=8)
    assert a.nll == pytest.approx(b.nll, rel=1e-6) and a.n_tokens_scored == b.n_tokens_scored


def test_bos_prepended_and_not_scored(model):
    stream = make_stream(40, seed=3)
    bos = 1
    res = perplexity(model, stream, block_len=64, bos_id=bos)
    ref = token_nll(model, torch.cat([torch.tensor([bos]), stream]))
    assert res.n_tokens_scored == 40 and res.bos
    assert res.nll == pytest.approx(ref.mean().item(), rel=1e-5)
    assert res.protocol.endswith("BOS prepended: yes")
    strided = perplexity(model, stream, block_len=16, stride=5, bos_id=bos)
    assert strided.n_tokens_scored == 40


def test_max_tokens_mode_restored_and_progress(model):
    stream = make_stream(200, seed=4)
    calls = []
    model.train()
    res = perplexity(
        model,
        stream,
        block_len=16,
        max_tokens=64,
        batch_size=3,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert model.training
    model.eval()
    assert res.n_tokens_scored == 64 - 4
    assert calls == [(3, 4), (4, 4)]
    assert res.to_dict()["ppl"] == res.ppl


def test_bad_arguments(model):
    stream = make_stream(10)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, stream, block_len=8, stride=9)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, stream, block_len=8, stride=8, bos_id=1)
    with pytest.raises(DataError):
        perplexity(model, stream[:1], block_len=8)


@pytest.mark.real
@pytest.mark.slow
def test_real_model_on_heldout_austen(demo_model_dir, austen):
    """SmolLM2-135M on a held-out book: a real English LM scores roughly 35 here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from efficientllm.training.data import read_documents, split_documents, tokenize_documents

    docs = read_documents(sorted(austen.values()))
    held_name = next(d.name for d in docs if "persuasion" in d.name.lower())
    train, held = split_documents(docs, heldout=[held_name], seed=0)
    assert [d.name for d in held] == [held_name] and len(train) == len(docs) - 1
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    stream = tokenize_documents(held, tok, add_bos=False)
    res = perplexity(model, stream, block_len=512, max_tokens=1024, batch_size=2)
    assert res.n_tokens_scored == 1022
    assert 20 < res.ppl < 60, res.protocol
