"""Named, complete run configurations shared by the CLI, the web app and the tests.

``model.source == "demo"`` is the bundled SmolLM2-135M demo model (``efficientllm demo-model``);
``demo:austen`` / ``demo:austen-heldout`` are Jane Austen's novels split by book.
"""

from __future__ import annotations

import copy
from typing import Any

from efficientllm.config import RunConfig
from efficientllm.errors import ConfigError

DEMO_MODEL = "demo"

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-debug": {
        "_help": "Seconds on a CPU with a tiny model: for tests and trying the pipeline.",
        "data": {"block_len": 32, "heldout_fraction": 0.2},
        "budget": {"target": "60%", "hidden_multiple": 1, "ffn_multiple": 1},
        "schedule": {"prune_fraction": 0.5, "prune_every": 2},
        "train": {
            "total_tokens": 32 * 4 * 40,
            "batch_size": 4,
            "lr": 1e-3,
            "recovery_lr": 1e-3,
            "warmup_steps": 2,
            "checkpoint_every": 10,
            "eval_tokens": 512,
        },
    },
    "cpu-demo": {
        "_help": "SmolLM2-135M -> 50% on Austen's novels, about 15 minutes on 2 CPU cores.",
        "model": {"source": DEMO_MODEL},
        "data": {"train": ["demo:austen"], "heldout": ["demo:austen-heldout"], "block_len": 256},
        "budget": {"target": "50%", "granularity": "global"},
        "schedule": {"prune_fraction": 0.5, "prune_every": 2},
        "train": {
            "total_tokens": 65536,
            "batch_size": 4,
            "lr": 1e-4,
            "recovery_lr": 1e-4,
            "warmup_steps": 4,
            "checkpoint_every": 16,
            "eval_tokens": 8192,
        },
    },
    "gpu-smollm2-360m-to-135m": {
        "_help": "SmolLM2-360M -> 135M on FineWeb-Edu (hub access), one modern GPU, ~1 hour.",
        "model": {"source": "HuggingFaceTB/SmolLM2-360M"},
        "data": {
            "train": ["hub:HuggingFaceFW/fineweb-edu"],
            "heldout_fraction": 0.01,
            "block_len": 2048,
        },
        "budget": {
            "target": "135M",
            "granularity": "global",
            "hidden_multiple": 64,
            "ffn_multiple": 64,
        },
        "schedule": {"prune_fraction": 0.6, "prune_every": 10},
        "train": {
            "total_tokens": 400_000_000,
            "batch_size": 16,
            "grad_accum": 4,
            "lr": 3e-4,
            "recovery_lr": 3e-4,
            "warmup_steps": 100,
            "eval_every": 500,
            "checkpoint_every": 500,
            "eval_tokens": 262144,
        },
    },
    "gpu-llama3.2-1b-to-500m": {
        "_help": "Llama-3.2-1B -> 500M on FineWeb-Edu (gated model: needs HF_TOKEN), 1-2 GPUs.",
        "model": {"source": "meta-llama/Llama-3.2-1B"},
        "data": {
            "train": ["hub:HuggingFaceFW/fineweb-edu"],
            "heldout_fraction": 0.01,
            "block_len": 2048,
        },
        "budget": {
            "target": "500M",
            "granularity": "global",
            "hidden_multiple": 64,
            "ffn_multiple": 64,
        },
        "schedule": {"prune_fraction": 0.6, "prune_every": 10},
        "train": {
            "total_tokens": 1_000_000_000,
            "batch_size": 8,
            "grad_accum": 8,
            "lr": 2e-4,
            "recovery_lr": 2e-4,
            "warmup_steps": 100,
            "eval_every": 500,
            "checkpoint_every": 500,
            "eval_tokens": 262144,
        },
    },
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_help(name: str) -> str:
    return PRESETS[name]["_help"]


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base`` (sections merge, values replace)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {k: v for k, v in copy.deepcopy(PRESETS[name]).items() if not k.startswith("_")}


def resolve_demo(cfg: RunConfig) -> RunConfig:
    """Replace ``model.source == "demo"`` with the prepared demo model folder."""
    if cfg.model.source != DEMO_MODEL:
        return cfg
    from efficientllm.assets import demo_model_path

    return cfg.replace(model={"source": str(demo_model_path())})


def build_config(
    *,
    preset: str | None = None,
    file_dict: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """preset < config file < explicit overrides, validated once at the end."""
    d: dict[str, Any] = preset_dict(preset) if preset else {}
    d = merge(d, file_dict or {})
    d = merge(d, overrides or {})
    return RunConfig.from_dict(d)
