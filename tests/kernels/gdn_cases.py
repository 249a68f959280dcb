"""Shared inputs of the Pallas gated delta rule tests: odd sizes, segments, errors.

Sizes are odd: T = 77 and 130 are not multiples of the chunk (64), Hv / Hk = 3 with two key heads
(so the key head index maps are exercised), dk = 24 != dv = 40 (padded inside the backends).
Errors are relative to the largest magnitude of the expected tensor: max|a - b| / max|b|.
"""

import numpy as np

B, HK, HV, DK, DV = 2, 2, 6, 24, 40
ORACLE_TOL = 1e-4  # fp32 kernel vs float64 oracle
GRAD_TOL = 1e-3  # VJP vs autodiff of the reference
BF16_TOL = 1e-2  # bf16 output rounding (2**-9) vs the oracle on the same rounded inputs


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def segment_ids(seq_len: int) -> np.ndarray:
    """Several segments per row: a start at the chunk edge (64) and one after it (65); row 1
    reuses id 0 after id 1, which must still reset the state."""
    starts = (((20, 1), (64, 2), (65, 3), (100, 4)), ((10, 1), (64, 0), (70, 2)))
    ids = np.zeros((B, seq_len), np.int32)
    for row, row_starts in enumerate(starts):
        for start, seg in row_starts:
            ids[row, start:] = seg
    return ids


def make_inputs(
    seed: int, seq_len: int, l2norm: bool = True, *, batch: int = B, dk: int = DK, dv: int = DV
) -> dict:
    """Fresh random fp32 inputs with a nonzero initial state; decays log-uniform in [-3, -1e-3]
    so slow heads carry state across chunks and segment resets visibly matter."""
    rng = np.random.default_rng(seed)
    qk_std = 1.0 if l2norm else dk**-0.5  # near unit norm keeps the rule stable without l2norm
    return {
        "q": (qk_std * rng.standard_normal((batch, seq_len, HK, dk))).astype(np.float32),
        "k": (qk_std * rng.standard_normal((batch, seq_len, HK, dk))).astype(np.float32),
        "v": rng.standard_normal((batch, seq_len, HV, dv)).astype(np.float32),
        "g": -np.exp(rng.uniform(np.log(1e-3), np.log(3.0), (batch, seq_len, HV))).astype(
            np.float32
        ),
        "beta": rng.uniform(0.05, 0.95, (batch, seq_len, HV)).astype(np.float32),
        "initial_state": rng.standard_normal((batch, HV, dk, dv)).astype(np.float32),
    }


def force_in_stack(monkeypatch) -> list:
    """Makes the jnp GDN decode take its in-stack form (`delta_rule_steps_by_sums`, chosen on
    TPU and GPU) on CPU too, from the next trace on; returns a list that gains an entry each
    time that form is traced, so a test can tell it ran (not a program cached without it)."""
    from qwenjax.kernels.gated_delta_rule import api

    traced, real = [], api._steps_in_stack
    monkeypatch.setattr(api, "STEPS_IN_STACK_PLATFORMS", ("cpu",))
    monkeypatch.setattr(api, "_steps_in_stack", lambda *a, **o: traced.append(1) or real(*a, **o))
    return traced
