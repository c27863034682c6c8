"""Write a (pruned) model to a folder that loads with ``AutoModelForCausalLM.from_pretrained``.

Two formats: ``efficientllm`` (heterogeneous widths; config.json with ``auto_map`` and the two
self-contained modeling files copied beside the weights, so ``trust_remote_code=True`` works
without efficientllm installed) and ``family`` (uniform widths; the family's own class and config,
loadable by vanilla transformers). Weights are safetensors only. Writes are atomic.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from efficientllm.choices import ExportFormat
from efficientllm.errors import ExportError
from efficientllm.modeling import (
    EfficientLLMForCausalLM,
    register_auto_classes,
    sync_config_,
)

logger = logging.getLogger(__name__)

FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
AUTO_MAP = {
    "AutoConfig": "configuration_efficientllm.EfficientLLMConfig",
    "AutoModelForCausalLM": "modeling_efficientllm.EfficientLLMForCausalLM",
}
_CODE_FILES = ("configuration_efficientllm.py", "modeling_efficientllm.py")
VERIFY_TOL = 1e-5


@dataclass(frozen=True)
class ExportResult:
    """Where and how a model was written."""

    path: Path
    fmt: Literal["efficientllm", "family"]
    num_params: int
    max_abs_diff: float | None
    """Max |logits(reloaded) - logits(in memory)|; None when not verified."""


def load_exported(path: str | os.PathLike[str], **kwargs: Any) -> PreTrainedModel:
    """Load an export with the locally registered classes (no remote code)."""
    register_auto_classes()
    kwargs.setdefault("dtype", "auto")
    return AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=False, use_safetensors=True, **kwargs
    )


def family_blockers(model: EfficientLLMForCausalLM) -> tuple[list[str], list[str]]:
    """Why ``model`` cannot be written as a vanilla family model: (hard, soft) reasons.

    Soft reasons (Qwen3 head-norm eps differing from the hidden norms' eps) are left to the
    logits verification when the family format is asked for explicitly.
    """
    cfg = model.config
    hard: list[str] = []
    if not cfg.is_uniform:
        hard.append("layers have different widths (heads / KV heads / FFN)")
    if cfg.num_attention_heads and cfg.hidden_size % cfg.num_attention_heads:
        hard.append(
            f"hidden_size {cfg.hidden_size} is not a multiple of the "
            f"{cfg.num_attention_heads} attention heads"
        )
    try:
        cfg.family_config(exact=True)
    except Exception as err:  # any validation failure blocks the family format
        hard.append(f"the {cfg.base_model_type} config rejects this shape: {err}")
    soft: list[str] = []
    if (
        cfg.base_model_type == "qwen3"
        and cfg.head_norm_eps is not None
        and not math.isclose(cfg.head_norm_eps, cfg.rms_norm_eps, rel_tol=1e-9, abs_tol=0.0)
    ):
        soft.append(
            f"q/k-norm eps {cfg.head_norm_eps:g} differs from rms_norm_eps {cfg.rms_norm_eps:g}"
        )
    return hard, soft


def _as_efficientllm(model: PreTrainedModel) -> EfficientLLMForCausalLM:
    if isinstance(model, EfficientLLMForCausalLM):
        sync_config_(model)
        return model
    if type(model).__name__ == "EfficientLLMForCausalLM":
        return model  # type: ignore[return-value]  # loaded through remote code: another class
    if getattr(model.config, "model_type", None) in (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
    ):
        return EfficientLLMForCausalLM.from_family(model)
    raise ExportError(f"cannot export a {type(model).__name__}; expected a Llama-style causal LM")


def _choose_format(
    model: EfficientLLMForCausalLM, fmt: ExportFormat, verify: bool
) -> Literal["efficientllm", "family"]:
    if fmt not in ("auto", "efficientllm", "family"):
        raise ExportError(f"unknown export format {fmt!r}; use auto, efficientllm or family")
    if fmt == "efficientllm":
        return fmt
    hard, soft = family_blockers(model)
    if fmt == "auto":
        return "family" if not hard and not soft else "efficientllm"
    if hard or (soft and not verify):
        why = "; ".join(hard + soft)
        raise ExportError(
            f"cannot export as a vanilla {model.config.base_model_type} model: {why}. "
            "Use fmt='efficientllm' (or 'auto')."
        )
    return "family"


def _write_model(model: EfficientLLMForCausalLM, tmp: Path, fmt: str) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    cfg = model.config
    if fmt == "efficientllm":
        code_dir = Path(__file__).parents[1] / "modeling"
        for name in _CODE_FILES:
            shutil.copyfile(code_dir / name, tmp / name)
        data = json.loads((tmp / "config.json").read_text())
        data["auto_map"] = dict(AUTO_MAP)
        data["architectures"] = ["EfficientLLMForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return
    fam = cfg.family_config(exact=True)
    fam.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.base_model_type]]
    fam.dtype = model.dtype
    (tmp / "config.json").unlink()
    fam.save_pretrained(tmp)


def _write_extra(tmp: Path, extra_files: dict[str, str | bytes]) -> None:
    for name, content in extra_files.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ExportError(f"extra file name {name!r} must be a relative path inside the export")
        if (tmp / rel).exists():
            raise ExportError(f"extra file {name!r} would overwrite a file of the export")
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (tmp / rel).write_bytes(content)
        else:
            (tmp / rel).write_text(content, encoding="utf-8")


def _check_files(tmp: Path) -> None:
    bad = [p.name for p in tmp.rglob("*") if p.suffix.lower() in FORBIDDEN_SUFFIXES]
    if bad:
        raise ExportError(
            f"export would contain pickle-based files {bad}; only safetensors allowed"
        )
    if not any(tmp.glob("*.safetensors")):
        raise ExportError("export has no .safetensors weights")


def _verify_input(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (2, 12), generator=g)


@torch.no_grad()
def _verify(model: EfficientLLMForCausalLM, tmp: Path) -> float:
    """Max abs logits difference between ``model`` and its reload from ``tmp``."""
    device = next(model.parameters()).device
    ids = _verify_input(model.config.vocab_size).to(device)
    was_training = model.training
    model.eval()
    try:
        ref = model(ids, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    impl = model.config._attn_implementation
    reloaded: Any = load_exported(tmp, attn_implementation=impl)
    reloaded = reloaded.to(device).eval()
    got = reloaded(ids, use_cache=False).logits.float()
    if got.shape != ref.shape:
        raise ExportError(f"reloaded logits have shape {tuple(got.shape)}, not {tuple(ref.shape)}")
    diff = float((got - ref).abs().max())
    del reloaded
    if not diff <= VERIFY_TOL:
        raise ExportError(
            f"the reloaded export differs from the model in memory (max |logits diff| = "
            f"{diff:.3g} > {VERIFY_TOL:g}); nothing was written"
        )
    return diff


def _install(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out`` atomically, replacing a previous export at ``out``."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if any(out.iterdir()) and not (out / "config.json").exists():
        raise ExportError(
            f"{out} is a non-empty folder that is not a model export; not replacing it"
        )
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, backup / "x")
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(backup / "x", out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def export_model(
    model: PreTrainedModel,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    fmt: ExportFormat = "auto",
    verify: bool = True,
    extra_files: dict[str, str | bytes] | None = None,
    fault: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write ``model`` (heterogeneous or family) to ``out_dir``; see the module docstring.

    ``fault`` (crash tests): called with ``"export_mid_write"`` once the weights are in the
    temporary folder and before the tokenizer, the extra files and the install."""
    out = Path(out_dir).resolve()
    model = _as_efficientllm(model)
    chosen = _choose_format(model, fmt, verify)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_model(model, tmp, chosen)
        if fault:
            fault("export_mid_write")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_extra(tmp, extra_files or {})
        _check_files(tmp)
        diff = _verify(model, tmp) if verify else None
        _install(tmp, out)
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"export to {out} failed: {type(err).__name__}: {err}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("exported %s model (%d parameters) to %s", chosen, num_params, out)
    return ExportResult(path=out, fmt=chosen, num_params=num_params, max_abs_diff=diff)


__all__ = ["ExportResult", "export_model", "family_blockers", "load_exported"]
