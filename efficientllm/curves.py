"""The keys of ``Pruned.saliency``: one mean-normalised-saliency curve per group kind.

Torch-free, so the trainer that writes the curves and the app that plots them share one name.
Events written before the keys were group kinds used ``head`` for the query heads;
:func:`saliency_curves` reads those too.
"""

from __future__ import annotations

from collections.abc import Mapping

from efficientllm.choices import SALIENCY_KINDS, SaliencyKind

__all__ = ["LEGACY_KEYS", "SALIENCY_KINDS", "SaliencyKind", "saliency_curves"]
LEGACY_KEYS: dict[str, SaliencyKind] = {"head": "qhead"}
"""Keys of older events -> the kind they meant."""


def saliency_curves(saliency: Mapping[str, float] | None) -> dict[str, float]:
    """An event's ``saliency`` keyed by group kind (legacy keys mapped; a current key wins)."""
    given = dict(saliency or {})
    out: dict[str, float] = {LEGACY_KEYS[k]: v for k, v in given.items() if k in LEGACY_KEYS}
    out.update((k, v) for k, v in given.items() if k not in LEGACY_KEYS)
    return out
