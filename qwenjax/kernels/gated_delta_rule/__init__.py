"""Gated delta rule (Gated DeltaNet recurrence): sequence and decode entry points."""

from qwenjax.kernels.gated_delta_rule.api import (
    auto_backend,
    gated_delta_decode,
    gated_delta_rule,
    gated_delta_step,
)

__all__ = ["auto_backend", "gated_delta_decode", "gated_delta_rule", "gated_delta_step"]
