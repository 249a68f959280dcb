"""Flax NNX modules of the Qwen3.5 / Qwen3.6 hybrid text model."""

from qwenjax.model.transformer import Qwen35

__all__ = ["Qwen35"]
