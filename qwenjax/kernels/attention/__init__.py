"""Attention kernels."""

from qwenjax.kernels.attention.api import attention, auto_backend

__all__ = ["attention", "auto_backend"]
