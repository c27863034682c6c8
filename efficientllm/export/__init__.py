"""Export a trained model for users: a transformers-loadable folder (``hf``) and more formats."""

from efficientllm.export.hf import (
    AUTO_MAP,
    ExportResult,
    export_model,
    family_blockers,
    load_exported,
)

__all__ = ["AUTO_MAP", "ExportResult", "export_model", "family_blockers", "load_exported"]
