"""Data-parallel throughput on CPU: one pruning-aware job on 2 processes against 1, same run.

The same job (a small random Llama with its own BPE tokenizer, trained on the Austen novels,
pruned to 50% over the first half of the tokens, then recovery) runs three times in a row, each
process in its own spawned interpreter on one thread:

- ``1 process``: global batch B on one process (1 core);
- ``2 processes``: B/2 per process, DDP over gloo (2 cores);
- ``1 process, 2 threads``: the same 2 cores used by intra-op threads instead.

Tokens/s = training tokens / summed step time (evaluation, checkpoints and export excluded),
from rank 0's ``StepMetrics``; the arms run ``--reps`` rounds (order reversed every other round)
and each keeps its best round, which filters out other load on a shared machine. The
2-process run sees the same blocks in the same order as the 1-process one, so their loss
curves must agree (the max difference is reported too).

    python -m bench.distributed               # ~3 min on 2 cores
    python -m bench.distributed --steps 12    # quicker, noisier

Writes bench/results/distributed/results.json and results.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.quality.source import random_model_folder, train_tokenizer
from efficientllm.assets import DEMO_HELDOUT_BOOK, austen_books
from efficientllm.config import RunConfig
from efficientllm.presets import build_config
from efficientllm.training.events import ListSink, StepMetrics
from efficientllm.training.launch import spawn
from efficientllm.training.trainer import Trainer

log = logging.getLogger("bench.distributed")
OUT = Path(__file__).resolve().parent / "results" / "distributed"
ARMS = (("1 process", 1, 1), ("2 processes", 2, 1), ("1 process, 2 threads", 1, 2))


def _source(folder: Path, books: list[Path]) -> Path:
    from transformers import LlamaConfig

    texts = [b.read_text(encoding="utf-8") for b in books]
    tok = train_tokenizer(texts, 2048, folder / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return random_model_folder(config, tok, folder / "model", seed=0)


def _job(rank: int, cfg: dict[str, Any], threads: int, report: str) -> None:
    torch.set_num_threads(threads)
    sink = ListSink()
    t0 = time.perf_counter()
    result = Trainer(RunConfig.from_dict(cfg), sink=sink).run()
    wall = time.perf_counter() - t0
    if rank == 0:
        steps = sink.of(StepMetrics)
        step_s = sum(s.tokens / s.step / s.tokens_per_s for s in steps)  # tokens per step / tok/s
        record = {
            "tokens": steps[-1].tokens,
            "train_s": step_s,
            "wall_s": wall,
            "params": result.params,
            "losses": {str(s.step): s.loss for s in steps},
        }
        Path(report).write_text(json.dumps(record), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=8, help="global batch (blocks)")
    ap.add_argument("--block-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2, help="rounds of all arms (best one kept)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    books = [p for name, p in austen_books().items() if name != DEMO_HELDOUT_BOOK]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        src = _source(Path(tmp) / "source", books)
        for rnd, (name, procs, threads) in enumerate(
            [arm for i in range(args.reps) for arm in (ARMS if i % 2 == 0 else ARMS[::-1])]
        ):
            over = {
                "model": {"source": str(src)},
                "data": {"train": [str(b) for b in books], "block_len": args.block_len},
                "budget": {"target": "50%", "granularity": "global"},
                "distill": {"weight": 0.0},
                "train": {
                    "total_tokens": args.steps * args.batch * args.block_len,
                    "batch_size": args.batch // procs,
                    "eval_tokens": 0,
                    "checkpoint_every": 0,
                    "device": "cpu",
                },
                "out_dir": str(Path(tmp) / f"run-{rnd}"),
            }
            cfg = build_config(preset="tiny-debug", overrides=over).to_dict()
            report = Path(tmp) / f"{rnd}.json"
            log.info("%s: %d steps of %d blocks x %d", name, args.steps, args.batch, args.block_len)
            spawn(_job, procs, cfg, threads, str(report))
            r = json.loads(report.read_text(encoding="utf-8"))
            r["tokens_per_s"] = r["tokens"] / r["train_s"]
            best = next((x for x in rows if x["arm"] == name), None)
            if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                rows = [x for x in rows if x["arm"] != name]
                rows.append({"arm": name, "processes": procs, "threads": threads, **r})
    rows.sort(key=lambda x: [a[0] for a in ARMS].index(x["arm"]))
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / base
    losses = [r.pop("losses") for r in rows]
    diff = max(abs(losses[1][k] - losses[0][k]) for k in losses[0])
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads available, "
        f"torch {torch.__version__}",
        "job": f"random Llama (d=256, 6 layers, 8/4 heads, FFN 768, BPE 2048) -> 50%, "
        f"{args.steps} steps, global batch {args.batch} x {args.block_len}, best of {args.reps}",
        "max_loss_diff_1_vs_2_processes": diff,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    md = _markdown(result)
    (args.out / "results.md").write_text(md, encoding="utf-8")
    log.info("%s", md)


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Job: {result['job']}. Machine: {result['machine']}.",
        "",
        "| arm | processes x threads | tokens/s | vs 1 process | train s | wall s | final params |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['arm']} | {r['processes']} x {r['threads']} | {r['tokens_per_s']:.0f} | "
            f"{r['ratio']:.2f}x | {r['train_s']:.1f} | {r['wall_s']:.1f} | {r['params']:,} |"
        )
    diff = result["max_loss_diff_1_vs_2_processes"]
    lines += ["", f"Max per-step loss difference, 1 vs 2 processes: {diff:.2g}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
