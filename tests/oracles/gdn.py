"""Float64 NumPy oracle for the gated delta rule: explicit loops over rows, value heads, tokens.

Written independently of `qwenjax.kernels.gated_delta_rule` from the recurrence
(FLA `naive_recurrent_gated_delta_rule`): value head j reads query/key head j // (Hv // Hk).
"""

import numpy as np


def gated_delta_rule_oracle(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    g: np.ndarray,
    beta: np.ndarray,
    *,
    scale: float | None = None,
    initial_state: np.ndarray | None = None,
    segment_ids: np.ndarray | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (out [B, T, Hv, dv], final state [B, Hv, dk, dv]), both float64."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    batch, seq_len, hk, dk = q.shape
    hv, dv = v.shape[2:]
    group = hv // hk
    if use_qk_l2norm:
        q = q / np.sqrt(np.sum(q * q, axis=-1, keepdims=True) + 1e-6)
        k = k / np.sqrt(np.sum(k * k, axis=-1, keepdims=True) + 1e-6)
    q = q * (dk**-0.5 if scale is None else scale)
    out = np.zeros((batch, seq_len, hv, dv))
    final = np.zeros((batch, hv, dk, dv))
    for b in range(batch):
        for j in range(hv):
            i = j // group
            if initial_state is None:
                s = np.zeros((dk, dv))
            else:
                s = np.array(initial_state[b, j], np.float64)
            for t in range(seq_len):
                if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    s = np.zeros((dk, dv))
                s = np.exp(g[b, t, j]) * s
                u = s.T @ k[b, t, i]
                delta = beta[b, t, j] * (v[b, t, j] - u)
                s = s + np.outer(k[b, t, i], delta)
                out[b, t, j] = s.T @ q[b, t, i]
            final[b, j] = s
    return out, final
