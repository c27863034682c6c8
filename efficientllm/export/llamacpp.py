"""llama.cpp through ``llama-cpp-python`` (the optional extra ``gguf``): load a GGUF written by
``export_gguf``, score tokens with it, and re-quantize it with llama.cpp's own quantizer
(K-quants such as Q4_K_M, which the Python ``gguf`` package cannot produce).

Everything here imports ``llama_cpp`` lazily and raises ``ExportError`` with the install hint
when it is missing, so the rest of the library never needs it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from efficientllm.errors import ExportError

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[gguf]" torch==2.13.0  (builds llama.cpp; a few minutes)'
# llama.cpp ftype names accepted by ``quantize_gguf`` -> the LLAMA_FTYPE_MOSTLY_* suffix.
K_QUANTS: tuple[str, ...] = (
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
    "q8_0",
)
GGML_TYPE_F32 = 0  # ggml_type id, for an f32 KV cache (exact comparisons)
_DEFAULTS_LOCK = threading.Lock()


def llama_cpp_module() -> Any:
    """The ``llama_cpp`` module, or ``ExportError`` saying how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ExportError(f"llama-cpp-python is not installed: {INSTALL_HINT}") from err
    return llama_cpp


def load_gguf(
    path: str | os.PathLike[str],
    *,
    n_ctx: int = 512,
    n_threads: int | None = None,
    logits_all: bool = False,
    f32_cache: bool = False,
    extra_buffers: bool = True,
    **kwargs: Any,
) -> Any:
    """A ``llama_cpp.Llama`` on CPU. ``f32_cache`` keeps the KV cache in f32 instead of f16
    (for comparisons with PyTorch at f32 precision). ``extra_buffers=False`` turns off
    llama.cpp's extra CPU buffer types (AMX / repacked weights; ``use_extra_bufts``): with them,
    llama.cpp 0.3.36's Q8_0 matmuls crash (SIGSEGV) on small widths on an AMX CPU (seen with
    hidden 64-512 and 32-row multiples), so use it for Q8_0 files of tiny models."""
    llama_cpp = llama_cpp_module()
    if f32_cache:
        kwargs.setdefault("type_k", GGML_TYPE_F32)
        kwargs.setdefault("type_v", GGML_TYPE_F32)
    threads = n_threads or max(1, len(os.sched_getaffinity(0)))
    low = llama_cpp.llama_cpp  # Llama() reads its model defaults from the ctypes module
    defaults = low.llama_model_default_params

    def without_extra_bufts() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    with _DEFAULTS_LOCK:
        if not extra_buffers:
            low.llama_model_default_params = without_extra_bufts
        try:
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=0,
                logits_all=logits_all,
                verbose=False,
                **kwargs,
            )
        finally:
            low.llama_model_default_params = defaults


def gguf_logits(llm: Any, tokens: list[int]) -> np.ndarray:
    """Logits [len(tokens), vocab] of one sequence from a fresh context (``logits_all=True``)."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens), :], dtype=np.float32)


def last_logits(llm: Any) -> np.ndarray:
    """The logits of the last evaluated token (a view into llama.cpp's buffer; copy to keep).
    Works with and without ``logits_all`` (``Llama.scores`` is only filled with it)."""
    llama_cpp = llama_cpp_module()
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def greedy_gguf(llm: Any, prompt: list[int], steps: int) -> list[int]:
    """``steps`` greedily decoded token ids after ``prompt`` (argmax of the logits, no sampler)."""
    llm.reset()
    llm.eval(list(prompt))
    out: list[int] = []
    for _ in range(steps):
        nxt = int(np.argmax(last_logits(llm)))
        out.append(nxt)
        llm.eval([nxt])
    return out


def quantize_gguf(
    src: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: str = "q4_k_m",
    *,
    n_threads: int | None = None,
) -> Path:
    """Re-quantize the GGUF ``src`` (best from an f32 or f16 export) to ``qtype`` with
    llama.cpp's quantizer; returns the resolved output path. Tensors whose rows do not split
    into K-quant blocks of 256 get llama.cpp's own fallback type. Written atomically."""
    llama_cpp = llama_cpp_module()
    key = qtype.lower()
    if key not in K_QUANTS:
        raise ExportError(f"unknown llama.cpp quantization {qtype!r}; use one of {K_QUANTS}")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{key.upper()}")
    src_path, out = Path(src).resolve(), Path(out_path).resolve()
    if not src_path.is_file():
        raise ExportError(f"{src_path} is not a GGUF file")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = n_threads or max(1, len(os.sched_getaffinity(0)))
        rc = llama_cpp.llama_model_quantize(
            str(src_path).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if rc != 0:
            raise ExportError(f"llama.cpp could not quantize {src_path.name} to {key} (code {rc})")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("quantized %s -> %s (%s)", src_path.name, out, key)
    return out


__all__ = [
    "INSTALL_HINT",
    "K_QUANTS",
    "gguf_logits",
    "greedy_gguf",
    "last_logits",
    "llama_cpp_module",
    "load_gguf",
    "quantize_gguf",
]
