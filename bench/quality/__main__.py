"""python -m bench.quality --scale cpu|cpu-real|gpu|tiny [--out DIR] [--arms a_best,a,b,b_kd,c,d]
[--jobs N] [--set key=value ...]"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from bench.quality.arms import final_eval
from bench.quality.runner import ArmContext, run_arms
from bench.quality.scales import SCALES
from bench.quality.specs import ARMS, parse_arms, scratch_parent


def _machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"{os.cpu_count()} CPU cores ({cpu}), {threads} torch threads, torch {torch.__version__}"


def _austen() -> tuple[list[Path], list[Path]]:
    from efficientllm.assets import DEMO_HELDOUT_BOOK, austen_books

    books = austen_books()
    train = [p for t, p in books.items() if t != DEMO_HELDOUT_BOOK]
    return train, [books[DEMO_HELDOUT_BOOK]]


def _kept(out: Path, scale) -> dict:
    """Arms of an earlier run in ``out`` (``--keep``), refused unless its settings match."""
    path = out / "results.json"
    if not path.is_file():
        return {"arms": {}, "commands": []}
    old = json.loads(path.read_text(encoding="utf-8"))
    # settings added to Scale after that run count as their defaults
    defaults = {f.name: f.default for f in dataclasses.fields(scale)}
    before = {**defaults, **old["setup"]["scale_settings"]}
    runs_only = ("arms", "jobs")  # which arms and how many at once: not a training setting
    now = {k: v for k, v in scale.__dict__.items() if k not in runs_only}
    if {k: v for k, v in before.items() if k not in runs_only} != now:
        raise SystemExit(f"error: --keep: {path} was made with other settings; drop --keep")
    setup = old["setup"]
    return {
        "arms": old["arms"],
        "commands": setup.get("commands", [setup["command"]]),
        "source_eval": old.get("source_eval"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/quality-<scale>")
    ap.add_argument(
        "--arms",
        default=None,
        help=f"comma list of {', '.join(ARMS)} (or letters abcde); default: the scale's list",
    )
    ap.add_argument("--jobs", type=int, default=None, help="arms side by side (default: scale's)")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the other arms of an earlier run with the same settings in --out/results.json",
    )
    ap.add_argument("--train", type=Path, nargs="*", help="training text files (default: Austen)")
    ap.add_argument("--heldout", type=Path, nargs="*", help="held-out text files")
    ap.add_argument("--source", help="override the scale's source (hub id, folder, demo)")
    ap.add_argument("--cache", type=Path, help="default <efficientllm cache>/bench-quality")
    ap.add_argument(
        "--source-only", action="store_true", help="prepare (pretrain) the source and stop"
    )
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="scale overrides")
    args = ap.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    from efficientllm.assets import cache_root
    from efficientllm.training.data import read_documents

    hf_logging.disable_progress_bar()  # one line per ~10% of each arm instead
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and datasets' bars
    scale = SCALES[args.scale].with_overrides(args.set)
    if args.source:
        scale = scale.with_overrides([f"source={args.source}"])
    arms = parse_arms(args.arms or scale.arms)
    out = args.out or Path("bench/results") / f"quality-{scale.name}"
    kept = _kept(out, scale) if args.keep else {"arms": {}, "commands": []}
    parent = scratch_parent(arms, kept["arms"]) if "c" in arms else None
    work = out / "runs"
    cache = args.cache or cache_root() / "bench-quality"
    if bool(args.train) != bool(args.heldout):
        raise SystemExit("error: give both --train and --heldout, or neither (Austen by book)")
    train_files, heldout_files = (args.train, args.heldout) if args.train else _austen()
    heldout_docs = read_documents(heldout_files)
    torch.manual_seed(scale.seed)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{(time.perf_counter() - t0) / 60:5.1f} min] {msg}", flush=True)

    source_meta = None
    if scale.source == "pretrain":
        from bench.quality.source import pretrained_source

        source, source_meta = pretrained_source(scale, train_files, heldout_files, cache, say)
        source_desc = (
            f"small Llama pretrained here on the training books ({source_meta['tokens']:,} "
            f"tokens, own BPE tokenizer of {source_meta['config']['vocab_size']} tokens)"
        )
    else:
        from efficientllm.assets import demo_model_path

        source = demo_model_path() if scale.source == "demo" else Path(scale.source)
        source_desc = "SmolLM2-135M (demo model)" if scale.source == "demo" else str(source)

    if args.source_only:
        say(f"source ready: {source}")
        return 0
    if scale.deterministic:  # every arm, one-shot scoring and evaluation alike
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
    from efficientllm.model_io import source_shape
    from efficientllm.pruning.budget import parse_budget

    src_params = source_shape(source).num_params()
    budget_params = parse_budget(scale.budget, src_params)
    results: dict[str, dict] = {k: v for k, v in kept["arms"].items() if k not in arms}
    task_cache = cache / "tasks"
    source_eval = kept.get("source_eval")
    if source_eval is None:
        say("source model: the same final evaluation, for reference")
        source_eval = final_eval(Path(source), heldout_docs, scale, task_cache)
    ctx = ArmContext(
        source=str(source),
        work=work,
        scale=scale,
        train_files=list(train_files),
        heldout_files=list(heldout_files),
        task_cache=task_cache,
        t0=time.time() - (time.perf_counter() - t0),
    )
    jobs = args.jobs if args.jobs is not None else scale.jobs
    results.update(run_arms(arms, ctx, jobs=jobs, parent=parent, done=results))
    if parent:
        results["c"]["follows"] = parent

    order = {k: results[k] for k in ARMS if k in results}
    first = next(iter(order.values()))
    from importlib.metadata import version

    command = "python -m bench.quality " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    res = {
        "setup": {
            "scale": scale.name,
            "commands": [*kept["commands"], command],
            "command": command,
            "machine": _machine(scale.device),
            "source": str(source) if scale.source != "pretrain" else "pretrain",
            "source_desc": source_desc,
            "source_params": src_params,
            "source_meta": source_meta,
            "budget": scale.budget,
            "budget_params": budget_params,
            "split": {
                "train": [Path(f).stem for f in train_files],
                "heldout": [Path(f).stem for f in heldout_files],
                "by": "book",
            },
            "arm_tokens": scale.arm_tokens,
            "jobs": jobs,
            "batch_size": scale.batch_size,
            "block_len": scale.block_len,
            "lr": scale.lr,
            "seed": scale.seed,
            "ppl_protocol": first["ppl_protocol"],
            "curve_protocol": first["eval_protocol"],
            "mc_items": scale.mc_items,
            "lm_eval_version": version("lm-eval"),
            "scale_settings": scale.__dict__,
        },
        "source_eval": source_eval,
        "arms": order,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    from bench.quality.report import markdown, scrub, write

    res = scrub(res, {str(cache) + os.sep: "<cache>/", os.getcwd() + os.sep: ""})

    for a in res["arms"].values():  # per-step losses only for short runs (file size)
        if len(a.get("loss", [])) > 2000:
            del a["loss"]
    paths = write(res, out)
    print(markdown(res))
    say("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
