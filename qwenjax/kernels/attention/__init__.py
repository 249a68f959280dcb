"""Attention kernels."""

from qwenjax.kernels.attention.api import attention

__all__ = ["attention"]
