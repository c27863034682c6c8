"""Inference speed of what users download: source vs pruned, PyTorch vs llama.cpp, side by side.

The demo SmolLM2-135M (source) and two one-shot pruned copies at 50% of its parameters (``global``:
heterogeneous per-layer widths, written as llama.cpp ``deci``; ``uniform``: equal widths, written
as ``llama``) run in one process, each in PyTorch (fp32, the safetensors export) and in llama.cpp
(llama-cpp-python, GGUF f16 and Q8_0). No training: speed depends on the shape only.

Per arm, batch 1: prefill tokens/s (one forward over a ``--prompt``-token prompt) and decode
tokens/s (``--decode`` greedy steps with the KV cache), median over ``--reps`` rounds; the rounds
interleave all arms (order reversed every other round) so machine noise hits them alike. Peak
memory is measured once per arm in a fresh subprocess (peak RSS while loading + prefill + decode,
minus the RSS before loading; llama.cpp's weights are mmapped and count once touched).
Pruned widths are multiples of 64 (hidden, FFN), as the run config's default, so Q8_0 blocks fit.
llama.cpp runs without its extra CPU buffer types (AMX / weight repacking), which crash on Q8_0
on this machine's AMX CPU (see ``efficientllm.export.llamacpp.load_gguf``). File size
is the size of the file(s) a user downloads. The ideal speedup of a pruned model is its parameter
ratio; ``reached / ideal`` is reported.

    python -m bench.speed                  # ~10 min on 2 cores
    python -m bench.speed --reps 3 --decode 32

Writes bench/results/speed/results.json and results.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("bench.speed")
OUT = Path(__file__).resolve().parent / "results" / "speed"
MODELS = ("source", "global", "uniform")
RUNTIMES = ("pytorch fp32", "llama.cpp f16", "llama.cpp q8_0")


def prepare(root: Path, calib_batches: int) -> dict[str, dict[str, Any]]:
    """Export the source and the two pruned models: safetensors + GGUF f16 + GGUF q8_0."""
    from efficientllm.assets import austen_books, demo_model_path
    from efficientllm.export import export_model
    from efficientllm.export.gguf import export_gguf
    from efficientllm.model_io import load_model, load_tokenizer
    from efficientllm.pruning.oneshot import prune_oneshot_

    src = demo_model_path()
    tok = load_tokenizer(src)
    text = austen_books()["Emma"].read_text(encoding="utf-8")[20_000:80_000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    batches = [torch.tensor([ids[i * 256 : (i + 1) * 256]]) for i in range(calib_batches)]
    out: dict[str, dict[str, Any]] = {}
    for name in MODELS:
        model = load_model(src)
        n0 = sum(p.numel() for p in model.parameters())
        if name != "source":
            prune_oneshot_(
                model,
                batches,
                budget=n0 // 2,
                granularity=name,
                hidden_multiple=64,
                ffn_multiple=64,
            )
        folder = root / name
        res = export_model(model, folder / "hf", tokenizer=tok)
        files = {"pytorch fp32": folder / "hf"}
        for dtype in ("f16", "q8_0"):
            files[f"llama.cpp {dtype}"] = export_gguf(
                model, tok, folder / f"{name}-{dtype}.gguf", dtype=dtype
            )
        cfg = model.config
        out[name] = {
            "params": res.num_params,
            "files": {k: str(v) for k, v in files.items()},
            "bytes": {k: _size(Path(v)) for k, v in files.items()},
            "shape": {
                "hidden": cfg.hidden_size,
                "heads": list(cfg.layer_num_attention_heads),
                "kv_heads": list(cfg.layer_num_key_value_heads),
                "ffn": list(cfg.layer_intermediate_size),
            },
        }
        log.info("%s: %s params", name, f"{res.num_params:,}")
    out["_prompt"] = {"ids": ids[5000:10000]}
    return out


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.glob("*.safetensors"))
    return p.stat().st_size


class TorchArm:
    def __init__(self, folder: str, threads: int) -> None:
        from efficientllm.model_io import load_model

        torch.set_num_threads(threads)
        self.model = load_model(folder)

    @torch.inference_mode()
    def run(self, prompt: list[int], steps: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        out = self.model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        cache = out.cache
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = self.model(nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


class LlamaCppArm:
    def __init__(self, path: str, threads: int, n_ctx: int) -> None:
        from efficientllm.export.llamacpp import load_gguf

        # extra_buffers off: llama.cpp 0.3.36's AMX/repacked Q8_0 path crashes on this CPU
        self.llm = load_gguf(
            path, n_ctx=n_ctx, n_threads=threads, n_batch=n_ctx, n_ubatch=n_ctx, extra_buffers=False
        )

    def run(self, prompt: list[int], steps: int) -> tuple[float, float]:
        import numpy as np

        from efficientllm.export.llamacpp import last_logits

        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([int(np.argmax(last_logits(self.llm)))])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


def _arm(runtime: str, path: str, threads: int, n_ctx: int) -> TorchArm | LlamaCppArm:
    if runtime.startswith("pytorch"):
        return TorchArm(path, threads)
    return LlamaCppArm(path, threads, n_ctx)


def peak_memory(runtime: str, path: str, prompt: list[int], steps: int, threads: int) -> int:
    """Peak RSS growth (bytes) of a fresh process that loads ``path`` and runs one round."""
    code = (
        "import json,sys,re;from pathlib import Path;"
        "from bench.speed import _arm,_rss;a=json.loads(sys.argv[1]);"
        "Path('/proc/self/clear_refs').write_text('5');base=_rss('VmRSS');"
        "arm=_arm(a['rt'],a['path'],a['threads'],a['n_ctx']);arm.run(a['prompt'],a['steps']);"
        "print(json.dumps(_rss('VmHWM')-base))"
    )
    arg = dict(rt=runtime, path=path, threads=threads, n_ctx=len(prompt) + steps + 8)
    arg.update(prompt=prompt, steps=steps)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(arg)],
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
    )
    return int(proc.stdout.strip().splitlines()[-1])


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(prep: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    prompt = prep["_prompt"]["ids"][: args.prompt]
    n_ctx = args.prompt + args.decode + 8
    arms = {
        (m, rt): _arm(rt, prep[m]["files"][rt], args.threads, n_ctx)
        for m in MODELS
        for rt in RUNTIMES
    }
    for arm in arms.values():  # warm-up: allocations, mmap page-in, thread pools
        arm.run(prompt[:32], 4)
    times: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in arms}
    order = list(arms)
    for r in range(args.reps):
        for key in order if r % 2 == 0 else order[::-1]:
            times[key].append(arms[key].run(prompt, args.decode))
        log.info("round %d/%d done", r + 1, args.reps)
    del arms
    rows = []
    for m, rt in order:
        pre = statistics.median(t[0] for t in times[(m, rt)])
        dec = statistics.median(t[1] for t in times[(m, rt)])
        mem = peak_memory(rt, prep[m]["files"][rt], prompt, args.decode, args.threads)
        rows.append(
            dict(
                model=m,
                runtime=rt,
                params=prep[m]["params"],
                prefill_tok_s=len(prompt) / pre,
                decode_tok_s=args.decode / dec,
                peak_mem_mb=mem / 2**20,
                file_mb=prep[m]["bytes"][rt] / 2**20,
                raw=[list(t) for t in times[(m, rt)]],
            )
        )
    base = {r["runtime"]: r for r in rows if r["model"] == "source"}
    for r in rows:
        b = base[r["runtime"]]
        r["ideal_speedup"] = b["params"] / r["params"]
        r["prefill_speedup"] = r["prefill_tok_s"] / b["prefill_tok_s"]
        r["decode_speedup"] = r["decode_tok_s"] / b["decode_tok_s"]
        r["prefill_reached_of_ideal"] = r["prefill_speedup"] / r["ideal_speedup"]
        r["decode_reached_of_ideal"] = r["decode_speedup"] / r["ideal_speedup"]
        # the same round's source and model ran back to back: their ratio cancels most of the
        # machine's drift (other jobs on a shared box), which medians taken apart do not
        paired = sorted(sb[1] / sm[1] for sb, sm in zip(b["raw"], r["raw"], strict=True))
        r["decode_speedup_paired"] = statistics.median(paired)
        r["decode_speedup_paired_range"] = [paired[0], paired[-1]]
        r["decode_reached_of_ideal_paired"] = r["decode_speedup_paired"] / r["ideal_speedup"]
    return {"prompt_tokens": len(prompt), "decode_tokens": args.decode, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Demo SmolLM2-135M vs one-shot pruned to 50% of its parameters (no training), batch 1, "
        f"prompt {result['prompt_tokens']} tokens, {result['decode_tokens']} greedy decode steps,"
        f" median of {result['reps']} interleaved rounds. Machine: {result['machine']}.",
        "",
        "| model | runtime | params | prefill tok/s | decode tok/s | prefill speedup | "
        "decode speedup | ideal | decode reached/ideal | paired decode speedup (min-max) | "
        "paired reached/ideal | peak MB | file MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lo, hi = r["decode_speedup_paired_range"]
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['params'] / 1e6:.2f}M | "
            f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['prefill_speedup']:.2f}x | "
            f"{r['decode_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
            f"{100 * r['decode_reached_of_ideal']:.0f}% | {r['decode_speedup_paired']:.2f}x "
            f"({lo:.2f}-{hi:.2f}) | {100 * r['decode_reached_of_ideal_paired']:.0f}% | "
            f"{r['peak_mem_mb']:.0f} | "
            f"{r['file_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(out: Path, result: dict[str, Any], md: str) -> None:
    """``out``/results.json and results.md (the table, also printed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "results.md").write_text(md, encoding="utf-8")
    sys.stdout.write(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (prefill)")
    ap.add_argument("--decode", type=int, default=64, help="greedy decode steps")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds of all arms")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-batches", type=int, default=4, help="one-shot calibration blocks")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
        prep = prepare(Path(tmp), args.calib_batches)
        result = measure(prep, args)
        shapes = {m: prep[m]["shape"] for m in MODELS}
    import llama_cpp

    result.update(
        reps=args.reps,
        threads=args.threads,
        shapes=shapes,
        machine=f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"llama-cpp-python {llama_cpp.__version__}",
        seconds=round(time.perf_counter() - t0, 1),
    )
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
