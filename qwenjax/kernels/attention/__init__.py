"""Attention kernels."""

from qwenjax.kernels.attention.api import attention, auto_backend, cache_attention

__all__ = ["attention", "auto_backend", "cache_attention"]
