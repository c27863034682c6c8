"""Where batch-1 decode time goes: source vs pruned in PyTorch fp32, by op category (issue 13).

The models, prompt and decode loop are bench.speed's (``prepare``, ``TorchArm``): the demo
SmolLM2-135M and its two one-shot 50%-parameter copies (``global``, ``uniform``). Per model, in
interleaved rounds (order reversed every other round), the decode steps run plain
(``TorchArm.run``, bench.speed's timing) and under ``torch.profiler`` (CPU, no shapes; the
prefill outside it). Each op's self CPU time (wall time on the calling thread, its intra-op
threads' work included) goes to a category by op name (``CATEGORIES``), except that all inside
the KV-cache update (transformers' ``DynamicLayer.update``, wrapped in a ``record_function`` in
profiled runs only) is ``kv cache``: its ``cat`` is not told from rotary's by name.
``python / framework`` = profiled wall time of the loop minus all ops' self time (module Python
code, ``nn.Module`` calls, dispatch before an op is recorded); caveat: the profiler's per-op
bookkeeping inflates it and the small ops (``profiled / plain`` shows by how much). Profiler-free
cross-check: ``linear replay`` times every ``nn.Linear`` (LM head apart) on a one-token input;
``plain - linear replay`` is all the rest. Rows are medians over ``--reps`` rounds, so they add
up only about. ``excess`` = a row's ms minus the source's ms / parameter ratio (the ideal).
``--llamacpp`` adds llama.cpp f16 decode: wall vs llama.cpp's own eval time (llama_perf_context).

    python -m bench.decode_profile --llamacpp      # ~5 min on 2 cores (+ ~4 min of exports)
    python -m bench.decode_profile --reps 5 --models /tmp/dp   # keep / reuse the exports there

Writes bench/results/decode_profile/results.json and results.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.speed import MODELS, LlamaCppArm, TorchArm, prepare, write_results

log = logging.getLogger("bench.decode_profile")
OUT = Path(__file__).resolve().parent / "results" / "decode_profile"
PY = "python / framework (outside ops)"
# op name (without "aten::") -> category, except the ops inside the KV-cache update (KV)
CATEGORIES: dict[str, tuple[str, ...]] = {
    k: tuple(v.split())
    for k, v in {
        "linear (mm, projections + LM head)": "mm addmm bmm matmul linear",
        "attention (sdpa)": "scaled_dot_product_attention"
        " _scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_attention_math"
        " _safe_softmax softmax _softmax",
        "norm / activation / rotary / elementwise": "mul add sub div div_ pow mean sum rsqrt silu"
        " neg cos sin cat exp",
        "copies / casts / embedding / argmax": "copy_ _to_copy to clone contiguous embedding"
        " index_select argmax arange fill_ zero_",
        "views / allocation (no arithmetic)": "view reshape _unsafe_view t transpose as_strided"
        " slice narrow select unsqueeze squeeze expand alias resolve_conj resolve_neg result_type"
        " empty empty_strided empty_like resize_ detach lift_fresh",
    }.items()
}
OTHER = "other (unlisted ops)"
KV = "kv cache (DynamicLayer.update: cat of past + new K/V)"  # whatever runs inside KV_MARK
KV_MARK = "kv_cache.update"
BY_NAME = {op: cat for cat, ops in CATEGORIES.items() for op in ops}
ROWS = [*list(CATEGORIES)[:2], KV, *list(CATEGORIES)[2:], OTHER, PY]
LIN = ROWS[0]


@contextmanager
def _marked_cache_updates(cache: Any) -> Iterator[None]:
    """Wrap the cache layers' ``update`` (transformers' DynamicLayer: two ``torch.cat``) in a
    ``record_function``: its cats look like rotary's ``cat`` by name, and shapes of a TensorList
    argument are not recorded."""

    def marked(orig: Callable[..., Any]) -> Callable[..., Any]:
        def update(*a: Any, **k: Any) -> Any:
            with record_function(KV_MARK):
                return orig(*a, **k)

        return update

    with ExitStack() as stack:
        for cls in {type(layer) for layer in cache.layers}:
            stack.enter_context(mock.patch.object(cls, "update", marked(cls.update)))
        yield


def self_times(events: Any) -> tuple[dict[str, float], dict[str, float], int]:
    """Self seconds per category and per op name, and the op count, from the profiler's raw
    events, which nest on their thread (``prof.events()`` builds that tree 100x slower)."""
    cats: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    stack: list[list[Any]] = [[-2, 0, "", "", 0]]  # frames: [thread, end, name, category, ns]
    calls = 0
    rows = sorted((e.start_thread_id(), e.start_ns(), -e.end_ns(), e.name()) for e in events)
    for tid, start, neg_end, name in [*rows, (-1, 0, 0, KV_MARK)]:  # the last one closes all
        while len(stack) > 1 and (stack[-1][0] != tid or stack[-1][1] <= start):
            _, _, done, cat, ns = stack.pop()
            cats[cat] += ns / 1e9
            ops[done] += ns / 1e9
        stack[-1][4] -= -neg_end - start  # a parent's self time excludes its children
        in_kv = stack[-1][3] == KV or name == KV_MARK
        cat = KV if in_kv else BY_NAME.get(name.removeprefix("aten::"), OTHER)
        calls += name != KV_MARK and stack[-1][2] != name  # aten::div_ -> aten::div_: one call
        stack.append([tid, -neg_end, name, cat, -neg_end - start])
    return dict(cats), dict(ops), calls


def decode_profiled(arm: TorchArm, prompt: list[int], steps: int) -> dict[str, Any]:
    """bench.speed's decode loop under the profiler: wall seconds, self seconds per category."""
    model = arm.model
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        with _marked_cache_updates(cache), profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(nxt, cache=cache, use_cache=True)
                cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
            wall = time.perf_counter() - t0
    cats, ops, calls = self_times(prof.profiler.kineto_results.events())
    cats[PY] = wall - sum(cats.values())
    return {"wall": wall, "cats": dict(cats), "ops": dict(ops), "calls": calls}


def llamacpp_decode(arm: LlamaCppArm, prompt: list[int], steps: int) -> tuple[float, float]:
    """bench.speed's llama.cpp decode loop: (wall seconds, llama.cpp's own eval seconds)."""
    import llama_cpp

    from efficientllm.export.llamacpp import last_logits

    llm = arm.llm
    llm.reset()
    llm.eval(prompt)
    # llama.cpp adds a decode to its stats at the next synchronize (the next logits read)
    llama_cpp.llama_synchronize(llm.ctx)
    llama_cpp.llama_perf_context_reset(llm.ctx)  # the prefill is not counted
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.eval([int(np.argmax(last_logits(llm)))])
    wall = time.perf_counter() - t0
    llama_cpp.llama_synchronize(llm.ctx)
    perf = llama_cpp.llama_perf_context(llm.ctx)
    assert perf.n_eval == steps, (perf.n_eval, steps)
    return wall, perf.t_eval_ms / 1e3


def load_models(folder: Path, calib_batches: int) -> dict[str, Any]:
    """bench.speed.prepare's exports in ``folder``, reused when ``folder/prep.json`` exists
    (prepare itself does not cache: it prunes and exports on every call)."""
    meta = folder / "prep.json"
    if meta.exists():
        log.info("reusing the exports in %s", folder)
        return json.loads(meta.read_text(encoding="utf-8"))
    prep = prepare(folder, calib_batches)
    meta.write_text(json.dumps(prep), encoding="utf-8")
    return prep


def linear_replay(arm: TorchArm, steps: int) -> tuple[float, float]:
    """Seconds for ``steps`` x every ``nn.Linear`` of the decoder layers, and of the LM head, on
    one token without the profiler: the matmul part of decode, timed like the plain loop."""
    head = arm.model.lm_head
    lins = [mod for mod in arm.model.modules() if isinstance(mod, torch.nn.Linear)]
    out = []
    for group in ([mod for mod in lins if mod is not head], [head]):
        xs = [torch.randn(1, 1, mod.in_features) for mod in group]
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(steps):
                for mod, x in zip(group, xs, strict=True):
                    torch.nn.functional.linear(x, mod.weight, mod.bias)
            out.append(time.perf_counter() - t0)
    return out[0], out[1]


def measure(prep: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    prompt, steps = prep["_prompt"]["ids"][: args.prompt], args.decode
    torch_arms = {m: TorchArm(prep[m]["files"]["pytorch fp32"], args.threads) for m in MODELS}
    n_ctx = args.prompt + steps + 8
    cpp_arms = {
        m: LlamaCppArm(prep[m]["files"]["llama.cpp f16"], args.threads, n_ctx)
        for m in (MODELS if args.llamacpp else ())
    }
    run: dict[str, Callable[[str, list[int], int], Any]] = {
        "plain": lambda m, p, n: torch_arms[m].run(p, n)[1],  # bench.speed's timing
        "linear replay": lambda m, p, n: linear_replay(torch_arms[m], n),  # beside plain
        "profiled": lambda m, p, n: decode_profiled(torch_arms[m], p, n),
        "llama.cpp f16": lambda m, p, n: llamacpp_decode(cpp_arms[m], p, n),
    }
    keys = [(m, k) for m in MODELS for k in run if k != "llama.cpp f16" or m in cpp_arms]
    for m, kind in keys:  # warm-up: allocations, thread pools, the profiler itself
        run[kind](m, prompt[:32], 4)
    raw: dict[tuple[str, str], list[Any]] = {k: [] for k in keys}
    for r in range(args.reps):
        for m, kind in keys if r % 2 == 0 else keys[::-1]:
            raw[(m, kind)].append(run[kind](m, prompt, steps))
        log.info("round %d/%d done", r + 1, args.reps)
    return summarize(prep, raw, steps, len(prompt))


def summarize(
    prep: dict[str, Any], raw: dict[tuple[str, str], list[Any]], steps: int, n_prompt: int
) -> dict[str, Any]:
    def ms(xs: Any) -> float:  # median of seconds per run -> ms per token
        return 1e3 * statistics.median(xs) / steps

    models: dict[str, Any] = {}
    for m in MODELS:
        prof, rep = raw[(m, "profiled")], raw[(m, "linear replay")]
        row: dict[str, Any] = {
            "params": prep[m]["params"],
            "ideal_speedup": prep["source"]["params"] / prep[m]["params"],
            "plain_ms": ms(raw[(m, "plain")]),
            "profiled_ms": ms(p["wall"] for p in prof),
            "ops_per_token": statistics.median(p["calls"] for p in prof) / steps,
            "cats_ms": {c: ms(p["cats"].get(c, 0.0) for p in prof) for c in ROWS},
            "ops_ms": {k: ms(p["ops"].get(k, 0.0) for p in prof) for k in prof[0]["ops"]},
            "raw_plain_s": raw[(m, "plain")],
            "raw_profiled_s": [p["wall"] for p in prof],
            "replay_ms": ms(map(sum, rep)),
            "replay_head_ms": ms(h for _, h in rep),
            # per round: the plain loop minus its matmuls, both without the profiler
            "rest_ms": ms(p - sum(r) for p, r in zip(raw[(m, "plain")], rep, strict=True)),
            "raw_replay_s": rep,
        }
        pairs = zip(row["raw_profiled_s"], row["raw_plain_s"], strict=True)
        row["profiled_over_plain"] = statistics.median(a / b for a, b in pairs)  # paired
        if (m, "llama.cpp f16") in raw:
            cpp = raw[(m, "llama.cpp f16")]
            row["llamacpp_f16"] = {
                "wall_ms": ms(w for w, _ in cpp),
                "eval_ms": ms(e for _, e in cpp),
                "outside_eval_ms": ms(w - e for w, e in cpp),
                "raw_s": cpp,
            }
        models[m] = row
    src = models["source"]
    for m in MODELS:
        row, ideal = models[m], models[m]["ideal_speedup"]
        row["plain_speedup"] = src["plain_ms"] / row["plain_ms"]
        # same round, back to back: paired ratios cancel most of the machine's drift
        paired = [s / x for s, x in zip(src["raw_plain_s"], row["raw_plain_s"], strict=True)]
        row["plain_speedup_paired"] = statistics.median(paired)
        row["plain_reached_of_ideal_paired"] = row["plain_speedup_paired"] / ideal
        row["excess_ms"] = {c: row["cats_ms"][c] - src["cats_ms"][c] / ideal for c in ROWS}
    return {"prompt_tokens": n_prompt, "decode_tokens": steps, "models": models}


def _at(*path: str) -> Callable[[dict[str, Any]], float]:
    def get(row: dict[str, Any]) -> float:
        val: Any = row
        for k in path:
            val = val[k]
        return float(val)

    return get


def markdown(result: dict[str, Any]) -> str:
    mods = result["models"]
    src = mods["source"]
    pruned = [m for m in MODELS if m != "source"]
    cols = " | ".join(f"{m} | source/{m} | {m}: excess over ideal" for m in pruned)
    lines = [
        f"Batch-1 decode, PyTorch fp32, prompt {result['prompt_tokens']} tokens, "
        f"{result['decode_tokens']} greedy steps, median of {result['reps']} interleaved rounds. "
        f"Machine: {result['machine']}. Rows: ms per decoded token; categories are self CPU time "
        f"under torch.profiler; excess = ms/token above the ideal share (source / param ratio).",
        "",
        f"| ms per decoded token | source | {cols} |",
        "|---" + "|---:" * (1 + 3 * len(pruned)) + "|",
    ]

    def line(label: str, key: Callable[[dict[str, Any]], float], fmt: str, extra: bool) -> None:
        s = key(src)
        vals = [format(s, fmt)]
        for m in pruned:
            x, ideal = key(mods[m]), mods[m]["ideal_speedup"]
            vals += [format(x, fmt), "", ""]
            if extra:
                vals[-2:] = ["-" if x <= 0 else f"{s / x:.2f}x", f"{x - s / ideal:+.2f}"]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")

    line("parameters (M)", lambda r: r["params"] / 1e6, ".1f", False)
    line("ideal speedup (parameter ratio)", _at("ideal_speedup"), ".2f", False)
    line("**plain wall (no profiler)**", _at("plain_ms"), ".1f", True)
    line("plain: paired speedup / ideal", _at("plain_reached_of_ideal_paired"), ".2f", False)
    line("&nbsp;&nbsp;linear replay (all nn.Linear, no profiler)", _at("replay_ms"), ".2f", True)
    line("&nbsp;&nbsp;&nbsp;&nbsp;of which LM head", _at("replay_head_ms"), ".2f", True)
    line("&nbsp;&nbsp;plain - linear replay (the rest)", _at("rest_ms"), ".2f", True)
    line("**profiled wall** (= sum of the rows below)", _at("profiled_ms"), ".1f", True)
    for c in ROWS:
        line(f"&nbsp;&nbsp;{c}", _at("cats_ms", c), ".2f", True)
    line(
        "&nbsp;&nbsp;(all but linear)", lambda r: r["profiled_ms"] - r["cats_ms"][LIN], ".2f", True
    )
    line("profiled / plain wall (paired by round)", _at("profiled_over_plain"), ".2f", False)
    line("ops per token", _at("ops_per_token"), ".0f", False)
    if "llamacpp_f16" in src:
        for key, label in (
            ("wall_ms", "llama.cpp f16: wall"),
            ("eval_ms", "&nbsp;&nbsp;inside llama_decode (llama_perf_context)"),
            ("outside_eval_ms", "&nbsp;&nbsp;Python loop (argmax, ctypes)"),
        ):
            line(label, _at("llamacpp_f16", key), ".2f", True)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (prefill)")
    ap.add_argument("--decode", type=int, default=64, help="greedy decode steps")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds of all arms")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-batches", type=int, default=4, help="one-shot calibration blocks")
    ap.add_argument("--models", type=Path, default=None, help="keep/reuse exports here")
    ap.add_argument("--llamacpp", action="store_true", help="add llama.cpp f16 eval timings")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="decode-profile-") as tmp:
        folder = args.models or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        prep = load_models(folder, args.calib_batches)
        result = measure(prep, args)
    result.update(
        reps=args.reps,
        threads=args.threads,
        shapes={m: prep[m]["shape"] for m in MODELS},
        machine=f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        seconds=round(time.perf_counter() - t0, 1),
    )
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
