"""The names of every choice in the method, defined once (torch-free).

The config's fields, the library's functions, the CLI's options, the web form's dropdowns and the
tests all take these ``Literal`` types and the tuples of their values from here, so a name cannot
drift between layers.
"""

from __future__ import annotations

from typing import Literal, get_args

GroupKind = Literal["qhead", "kvgroup", "ffn", "hidden", "layer"]
"""What a group removes: a query head, a KV group (with its query heads), FFN channels, hidden
channels (in every layer), or a whole decoder layer."""
GROUP_KINDS: tuple[GroupKind, ...] = get_args(GroupKind)

SaliencyKind = Literal["qhead", "ffn", "hidden"]
"""Group kinds whose mean normalised saliency is reported (``Pruned.saliency``) and plotted."""
SALIENCY_KINDS: tuple[SaliencyKind, ...] = get_args(SaliencyKind)

Granularity = Literal["global", "uniform"]
"""uniform: every layer keeps the same widths; global: widths per layer chosen by saliency."""
GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)

Scorer = Literal["taylor1", "taylor_mix", "magnitude", "random"]
"""Element importance: |w·g|, |w·g − F·w²/2|, |w|, or random (a control)."""
SCORERS: tuple[Scorer, ...] = get_args(Scorer)

Fisher = Literal["grad2", "adam"]
SaliencyMode = Literal["window", "ema"]
Trajectory = Literal["linear", "cubic"]
LRSchedule = Literal["rewarm", "continuous"]
Compensation = Literal["none", "obs"]
DistillPhases = Literal["both", "prune", "recovery"]
Dtype = Literal["auto", "float32", "bfloat16"]
ExportFormat = Literal["auto", "efficientllm", "family"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)
GGUFDtype = Literal["f32", "f16", "q8_0"]
"""Types a GGUF file's 2-D weights are written in from Python (1-D tensors stay f32)."""
GGUF_DTYPES: tuple[GGUFDtype, ...] = get_args(GGUFDtype)
GGUFChoice = Literal["none", "f32", "f16", "q8_0"]
"""What a run writes for llama.cpp beside its export: nothing, or a GGUF file of that type."""
GGUF_CHOICES: tuple[GGUFChoice, ...] = get_args(GGUFChoice)
Phase = Literal["prune", "recovery"]
