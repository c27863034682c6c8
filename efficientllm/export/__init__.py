"""Export a trained model for users: a transformers-loadable folder (``hf``), a GGUF file for
llama.cpp (``gguf``; K-quants and a runtime check through ``llamacpp``, extra ``gguf``) and
optional int8 weight-only quantization for PyTorch (``quantize``, needs torchao)."""

from efficientllm.export.gguf import (
    GGUF_DTYPES,
    GGUFArch,
    GGUFDtype,
    export_gguf,
    export_gguf_folder,
    gguf_blockers,
)
from efficientllm.export.hf import (
    AUTO_MAP,
    ExportResult,
    export_model,
    family_blockers,
    load_exported,
)

__all__ = [
    "AUTO_MAP",
    "GGUF_DTYPES",
    "ExportResult",
    "GGUFArch",
    "GGUFDtype",
    "export_gguf",
    "export_gguf_folder",
    "export_model",
    "family_blockers",
    "gguf_blockers",
    "load_exported",
]
