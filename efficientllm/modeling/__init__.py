"""Placeholder until the heterogeneous model lands."""


def register_auto_classes() -> None:
    """Register the heterogeneous config/model with transformers' Auto classes."""
