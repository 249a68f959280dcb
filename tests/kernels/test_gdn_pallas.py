"""Both Pallas gated delta rule backends through the dispatch, interpreted on CPU.

Values vs the float64 oracle, the VJP w.r.t. every differentiable input vs autodiff of the
token-serial reference, the optional inputs absent, and bf16 inputs. Sizes and tolerances: see
`gdn_cases`. Backend-specific checks (the interpreters, TPU compiles, the CUDA lowering, launch
options) live in test_gdn_pallas_tpu.py and test_gdn_pallas_gpu.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.kernels.gated_delta_rule import gated_delta_rule
from tests.kernels.gdn_cases import (
    BF16_TOL,
    DK,
    DV,
    GRAD_TOL,
    HV,
    ORACLE_TOL,
    B,
    make_inputs,
    rel_err,
    segment_ids,
)
from tests.oracles.gdn import gated_delta_rule_oracle

BACKENDS = ["pallas_tpu", "pallas_gpu"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_values_and_vjp_match_oracle_and_reference(backend: str):
    """Random cotangents on out and final state; T = 130 spans three chunks with resets."""
    seq_len = 130
    x, seg = make_inputs(1, seq_len), segment_ids(seq_len)
    rng = np.random.default_rng(2)
    cot = (
        rng.standard_normal((B, seq_len, HV, DV)).astype(np.float32),
        rng.standard_normal((B, HV, DK, DV)).astype(np.float32),
    )

    @functools.partial(jax.jit, static_argnums=1)
    def values_and_vjp(inputs, backend):
        fn = functools.partial(gated_delta_rule, segment_ids=seg, backend=backend)
        outputs, vjp = jax.vjp(lambda kw: fn(**kw), inputs)
        return outputs, vjp(cot)[0]

    (out, state), grads = values_and_vjp(x, backend)
    _, grads_ref = values_and_vjp(x, "reference")
    out_ref, state_ref = gated_delta_rule_oracle(**x, segment_ids=seg)
    assert rel_err(out, out_ref) <= ORACLE_TOL, f"out rel err {rel_err(out, out_ref):.2e}"
    assert rel_err(state, state_ref) <= ORACLE_TOL, f"state {rel_err(state, state_ref):.2e}"
    for name in x:
        err = rel_err(grads[name], grads_ref[name])
        assert err <= GRAD_TOL, f"d/d{name}: rel err {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_segments_no_initial_state_and_options(backend: str):
    """The optional inputs absent (None through the custom VJPs), no l2norm, explicit scale."""
    seq_len, options = 77, {"use_qk_l2norm": False, "scale": 0.7}
    x = make_inputs(3, seq_len, l2norm=False)
    del x["initial_state"]
    fn = functools.partial(gated_delta_rule, backend=backend, **options)
    out, state = jax.jit(fn)(**x)
    out_ref, state_ref = gated_delta_rule_oracle(**x, **options)
    assert rel_err(out, out_ref) <= ORACLE_TOL
    assert rel_err(state, state_ref) <= ORACLE_TOL

    def loss(fn, q, k):
        return jnp.sum(fn(q, k, x["v"], x["g"], x["beta"])[0] ** 2)

    ref = functools.partial(gated_delta_rule, backend="reference", **options)
    grads = jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1)))(x["q"], x["k"])
    grads_ref = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1)))(x["q"], x["k"])
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(grad, grad_ref) <= GRAD_TOL


# (out, state) tolerances for bf16 q, k, v. The TPU kernel upcasts and computes in fp32, so only
# the output rounding remains and the state stays exact. The GPU kernels multiply in bf16 with
# fp32 accumulation (as flash-linear-attention does): u, w and the state rounded as matmul
# operands add bf16-sized error to both (measured ~5e-3 here).
BF16_TOLS = {"pallas_tpu": (BF16_TOL, ORACLE_TOL), "pallas_gpu": (2 * BF16_TOL, 2 * BF16_TOL)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_stay_within_bf16_tolerance(backend: str):
    seq_len = 77
    x = {k: jnp.asarray(v, jnp.bfloat16) for k, v in make_inputs(4, seq_len).items()}
    x["initial_state"] = x["initial_state"].astype(jnp.float32)
    seg = segment_ids(seq_len)
    out, state = jax.jit(functools.partial(gated_delta_rule, backend=backend))(**x, segment_ids=seg)
    # The oracle sees the same bf16-rounded inputs, so only compute and output rounding remain.
    out_ref, state_ref = gated_delta_rule_oracle(
        **{k: np.asarray(v, np.float64) for k, v in x.items()}, segment_ids=seg
    )
    out_tol, state_tol = BF16_TOLS[backend]
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert rel_err(out, out_ref) <= out_tol
    assert rel_err(state, state_ref) <= state_tol
