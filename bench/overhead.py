"""Overhead of pruning-aware pretraining, measured side by side in one process.

1. Step overhead, same shape: a plain training step (forward, backward, AdamW) against the same
   step with saliency accumulation (``compute_unit_scores`` + ``SaliencyAccumulator.update``),
   interleaved rep by rep so machine noise hits both alike; ratio of medians.
2. Whole run: pruning-aware pretraining (trajectory to the budget over the first half, then
   recovery) against plain training of the source for the same tokens and batches; ratio of the
   summed step times (evaluation, checkpoints and export excluded from both).

    python bench/overhead.py                  # the SmolLM2-135M demo model on Austen (~10 min)
    python bench/overhead.py --steps 8 --reps 3   # quicker, noisier

Writes bench/results/overhead.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from efficientllm.assets import DEMO_HELDOUT_BOOK, austen_books, demo_model_path
from efficientllm.model_io import load_model, load_tokenizer
from efficientllm.presets import build_config
from efficientllm.pruning.saliency import SaliencyAccumulator, compute_unit_scores
from efficientllm.training.data import pack_blocks, read_documents, tokenize_documents
from efficientllm.training.events import ListSink, StepMetrics
from efficientllm.training.trainer import Trainer


def _step(
    model,
    opt,
    batch,
    acc: SaliencyAccumulator | None,
    clip: bool = False,
    parts: dict | None = None,
) -> float:
    t0 = time.perf_counter()
    loss = model(batch, labels=batch).loss
    loss.backward()
    del loss
    t1 = time.perf_counter()
    if acc is not None:
        acc.update(compute_unit_scores(model, scorer="taylor1"))
    t2 = time.perf_counter()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    if parts is not None:
        parts.setdefault("fwd_bwd", []).append(t1 - t0)
        parts.setdefault("saliency", []).append(t2 - t1)
    return t3 - t0


def step_overhead(source: str, batches: list[torch.Tensor], reps: int) -> dict:
    model = load_model(source).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    acc = SaliencyAccumulator()
    _step(model, opt, batches[0], None)  # warm-up (allocations, AdamW state)
    _step(model, opt, batches[0], acc)
    plain, sal, parts = [], [], {}
    for i in range(reps):  # paired, alternating order, so slow phases hit both arms alike
        b = batches[i % len(batches)]
        if i % 2:
            sal.append(_step(model, opt, b, acc, parts=parts))
            plain.append(_step(model, opt, b, None))
        else:
            plain.append(_step(model, opt, b, None))
            sal.append(_step(model, opt, b, acc, parts=parts))
    ratios = [s / p for s, p in zip(sal, plain, strict=True)]
    component = [s / f for s, f in zip(parts["saliency"], parts["fwd_bwd"], strict=True)]
    return {
        "plain_s": statistics.median(plain),
        "saliency_s": statistics.median(sal),
        "ratio": statistics.median(ratios),
        "saliency_over_fwd_bwd": statistics.median(component),
        "reps": reps,
        "plain_all": plain,
        "saliency_all": sal,
        "parts": parts,
    }


def whole_run(
    source: str, train_files: list[str], steps: int, block_len: int, batch_size: int
) -> dict:
    tokens = steps * batch_size * block_len
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(
            overrides={
                "model": {"source": source},
                "data": {"train": train_files, "heldout_fraction": 0.1, "block_len": block_len},
                "budget": {"target": "50%"},
                "schedule": {"prune_fraction": 0.5, "prune_every": 2},
                "train": {
                    "total_tokens": tokens,
                    "batch_size": batch_size,
                    "lr": 1e-4,
                    "recovery_lr": 1e-4,
                    "warmup_steps": 2,
                    "eval_tokens": 0,
                    "checkpoint_every": 0,
                },
                "out_dir": tmp,
            }
        )
        sink = ListSink()
        trainer = Trainer(cfg, sink=sink)
        trainer.run()
        steps_ev = sink.of(StepMetrics)
        pat = sum(e.tokens_per_s and (batch_size * block_len) / e.tokens_per_s for e in steps_ev)
        final_params = steps_ev[-1].params
        # plain training of the source on the same blocks in the same order
        from efficientllm.training.data import BlockSampler
        from efficientllm.training.rundata import prepare

        tok = load_tokenizer(source)
        data = prepare(cfg.data, tok, seed=cfg.train.seed)
        sampler = BlockSampler(data.train_blocks, batch_size=batch_size, seed=cfg.train.seed)
        model = load_model(source).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        plain = 0.0
        for _ in range(steps):
            plain += _step(model, opt, next(sampler), None, clip=True)
    return {
        "steps": steps,
        "tokens": tokens,
        "pruning_aware_s": pat,
        "plain_s": plain,
        "ratio": pat / plain,
        "final_params": final_params,
        "source_params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="'demo' or a model folder / hub id")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps of each whole run")
    ap.add_argument("--reps", type=int, default=6, help="interleaved reps of the step overhead")
    ap.add_argument("--block-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="bench/results/overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source = str(demo_model_path()) if args.model == "demo" else args.model
    books = austen_books()
    train_files = [str(p) for t, p in books.items() if t != DEMO_HELDOUT_BOOK]
    tok = load_tokenizer(source)
    stream = tokenize_documents(read_documents(train_files[:1]), tok, add_bos=False)
    blocks = pack_blocks(stream, args.block_len)
    batches = [
        blocks[i : i + args.batch_size] for i in range(0, 8 * args.batch_size, args.batch_size)
    ]
    t0 = time.time()
    res = {
        "model": args.model,
        "threads": args.threads,
        "block_len": args.block_len,
        "batch_size": args.batch_size,
        "torch": torch.__version__,
        "step": step_overhead(source, copy.copy(batches), args.reps),
        "run": whole_run(source, train_files, args.steps, args.block_len, args.batch_size),
    }
    res["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    s, r = res["step"], res["run"]
    print("| measurement | plain | pruning-aware | ratio |")
    print("|---|---|---|---|")
    print(
        f"| one step, same shape (median of {s['reps']} paired ratios) | {s['plain_s']:.2f} s | "
        f"{s['saliency_s']:.2f} s | {s['ratio']:.3f}x |"
    )
    print(
        f"| saliency scoring alone vs forward+backward (median) | | | "
        f"{s['saliency_over_fwd_bwd']:.3f}x |"
    )
    print(
        f"| whole run, {r['steps']} steps / {r['tokens']:,} tokens "
        f"({r['source_params']:,} -> {r['final_params']:,} params) | {r['plain_s']:.1f} s | "
        f"{r['pruning_aware_s']:.1f} s | {r['ratio']:.3f}x |"
    )


if __name__ == "__main__":
    main()
