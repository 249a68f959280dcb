"""Gated delta rule: reference and chunked backends vs a float64 NumPy oracle, values and VJPs.

Errors are relative to the largest magnitude of the expected tensor: max|a - b| / max|b|.
Sizes are deliberately odd: T = 150 is not a multiple of the chunk (64), Hv / Hk = 3, dk != dv.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.kernels.gated_delta_rule import gated_delta_rule, gated_delta_step
from qwenjax.kernels.gated_delta_rule.xla import _invert_unit_lower, _masked_exp
from tests.oracles.gdn import gated_delta_rule_oracle

B, HK, HV, DK, DV = 2, 2, 6, 24, 40
# Per-row segment starts: a boundary exactly at the chunk edge (64) and one right after (65);
# row 1 reuses id 0 after id 1, which must still reset the state.
SEGMENT_STARTS = (((30, 1), (64, 2), (65, 3), (120, 4)), ((10, 1), (64, 0), (100, 2)))

# Tolerances per compute precision: fp32 backends vs the float64 oracle, chunked vs reference.
ORACLE_TOL = {np.float32: 1e-4, np.float64: 1e-12}
BACKEND_TOL = {np.float32: 1e-5, np.float64: 1e-12}
BF16_TOL = 1e-2  # bf16 output rounding (2**-9) vs the oracle on the same rounded inputs


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def segment_ids(seq_len: int) -> np.ndarray:
    ids = np.zeros((B, seq_len), np.int32)
    for row, starts in enumerate(SEGMENT_STARTS):
        for start, seg in starts:
            ids[row, start:] = seg
    return ids


def make_inputs(seed: int, seq_len: int, l2norm: bool = True, dtype=np.float32) -> dict:
    """Random inputs; without l2norm, q and k are drawn near unit norm so the rule stays stable."""
    rng = np.random.default_rng(seed)
    qk_std = 1.0 if l2norm else DK**-0.5
    return {
        "q": (qk_std * rng.standard_normal((B, seq_len, HK, DK))).astype(dtype),
        "k": (qk_std * rng.standard_normal((B, seq_len, HK, DK))).astype(dtype),
        "v": rng.standard_normal((B, seq_len, HV, DV)).astype(dtype),
        # Log-uniform decays in [-3, -1e-3]: slow heads keep memory across many tokens, so resets
        # and the initial state visibly matter.
        "g": -np.exp(rng.uniform(np.log(1e-3), np.log(3.0), (B, seq_len, HV))).astype(dtype),
        "beta": rng.uniform(0.05, 0.95, (B, seq_len, HV)).astype(dtype),
        "initial_state": rng.standard_normal((B, HV, DK, DV)).astype(dtype),
    }


# (seq_len, dtype, options): T=1 is a single padded chunk, T=64 exactly one chunk, T=150 three
# chunks. Float64 inputs make both backends compute in float64 (under x64), which checks the
# chunked algebra and its segment masks exactly.
CASES = {
    "T1": (1, np.float32, {}),
    "T64": (64, np.float32, {}),
    "T150": (150, np.float32, {}),
    "T150-no-l2norm-scale": (150, np.float32, {"use_qk_l2norm": False, "scale": 0.7}),
    "T150-float64": (150, np.float64, {}),
}


@functools.cache
def case_outputs(case: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(out, final_state) per backend and the oracle; cached so each case compiles once."""
    seq_len, dtype, options = CASES[case]
    inputs = make_inputs(seq_len, seq_len, options.get("use_qk_l2norm", True), dtype)
    seg = segment_ids(seq_len)
    results = {"oracle": gated_delta_rule_oracle(**inputs, segment_ids=seg, **options)}
    with jax.enable_x64(dtype == np.float64):
        for backend in ("reference", "chunked"):
            run = jax.jit(functools.partial(gated_delta_rule, backend=backend, **options))
            results[backend] = jax.device_get(run(**inputs, segment_ids=seg))
    return results


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    ("actual", "expected", "tols"),
    [
        ("reference", "oracle", ORACLE_TOL),
        ("chunked", "oracle", ORACLE_TOL),
        ("chunked", "reference", BACKEND_TOL),
    ],
)
def test_backend_matches(case: str, actual: str, expected: str, tols: dict):
    seq_len, dtype, _ = CASES[case]
    results = case_outputs(case)
    (out, state), (out_ref, state_ref) = results[actual], results[expected]
    assert out.shape == (B, seq_len, HV, DV) and out.dtype == state.dtype == dtype
    tol = tols[dtype]
    assert rel_err(out, out_ref) <= tol, f"out rel err {rel_err(out, out_ref):.2e}"
    assert rel_err(state, state_ref) <= tol, f"state rel err {rel_err(state, state_ref):.2e}"


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_packing_equals_separate_documents(backend: str):
    """Two documents packed in one row equal each run alone (the first with the initial state).

    The boundary (75) falls mid-chunk, so the second document starts at chunk offset 11.
    """
    split, seq_len = 75, 150
    x = make_inputs(1, seq_len)
    seg = np.repeat(np.array([[0] * split + [1] * (seq_len - split)], np.int32), B, axis=0)
    run = jax.jit(functools.partial(gated_delta_rule, backend=backend))
    out, state = run(**x, segment_ids=seg)
    docs = [{k: v[:, :split] for k, v in x.items()}, {k: v[:, split:] for k, v in x.items()}]
    docs[0]["initial_state"] = x["initial_state"]
    docs[1]["initial_state"] = np.zeros_like(x["initial_state"])  # same signature: one compile
    (first, _), (second, second_state) = run(**docs[0]), run(**docs[1])
    tol = BACKEND_TOL[np.float32]
    assert rel_err(out[:, :split], first) <= tol
    assert rel_err(out[:, split:], second) <= tol
    assert rel_err(state, second_state) <= tol


@pytest.mark.parametrize(("dtype", "tol"), [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_chunked_vjp_matches_reference(dtype, tol: float):
    """VJPs w.r.t. every differentiable input under a random cotangent, chunked vs reference."""
    seq_len = 150
    x = make_inputs(2, seq_len, dtype=dtype)
    rng = np.random.default_rng(3)
    cot_out = rng.standard_normal((B, seq_len, HV, DV)).astype(dtype)
    cot_state = rng.standard_normal((B, HV, DK, DV)).astype(dtype)
    seg = segment_ids(seq_len)

    def loss(inputs, backend):
        out, state = gated_delta_rule(**inputs, segment_ids=seg, backend=backend)
        return jnp.sum(out * cot_out) + jnp.sum(state * cot_state)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    with jax.enable_x64(dtype == np.float64):
        grads = {b: jax.device_get(grad(x, b)) for b in ("reference", "chunked")}
    for name in x:
        err = rel_err(grads["chunked"][name], grads["reference"][name])
        assert err <= tol, f"d/d{name}: rel err {err:.2e}"


def test_chunk_inverse_gradient_is_the_inverse_s_own():
    """(I + a)^-1 by block doubling: values and VJP vs autodiff of a dense float64 inverse of
    I + strict_lower(a), for a full random a (its entries on and above the diagonal get zero
    gradient); the VJP keeps only the inverse itself, not the log2(C) levels' intermediates."""
    c = 37  # not a power of two: the last doubling level is partial
    rng = np.random.default_rng(11)
    a = rng.standard_normal((2, 3, c, c)) * 0.3
    ct = rng.standard_normal(a.shape)

    def doubling(a):
        return _invert_unit_lower(a, jax.lax.Precision.HIGHEST)

    def dense(a):
        return jnp.linalg.inv(jnp.eye(c) + jnp.tril(a, -1))

    with jax.enable_x64(True):
        a = jnp.asarray(a)
        assert rel_err(doubling(a), dense(a)) <= 1e-12
        grads = [jax.grad(lambda a, f=f: jnp.sum(f(a) * ct))(a) for f in (doubling, dense)]
        assert rel_err(grads[0], grads[1]) <= 1e-12
        _, vjp = jax.vjp(doubling, a)
        assert sum(x.size for x in jax.tree.leaves(vjp)) == a.size


def test_masked_exp_gradient_keeps_only_its_output():
    """exp on a mask, 0 off it: gradient exp(x) dx on the mask and 0 off it, finite where x is
    huge off the mask; the backward keeps the output alone (not the masks or the inner wheres)."""
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((3, 5, 7)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=x.shape) < 0.6)
    x = jnp.where(mask, x, 1e4)  # exp would overflow to inf off the mask
    ct = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    y, vjp = jax.vjp(lambda x: _masked_exp(x, mask), x)
    assert rel_err(y, np.where(mask, np.exp(np.where(mask, x, 0.0)), 0.0)) <= 1e-7
    (dx,) = vjp(ct)
    assert np.isfinite(dx).all()
    assert rel_err(dx, np.where(mask, np.exp(np.where(mask, x, 0.0)) * ct, 0.0)) <= 1e-7
    assert sum(r.size for r in jax.tree.leaves(vjp)) == x.size


def test_chunked_backward_keeps_few_chunk_square_arrays():
    """What the chunked VJP keeps, in units of one [C, C] array per chunk and value head (the
    intra-chunk matrices): about 11 here (dk = dv = C / 2), with the inverse's and the decay
    masks' own derivatives; autodiff of them kept 46."""
    b, t, hk, hv, d, c = 1, 512, 2, 6, 32, 64
    rng = np.random.default_rng(13)
    q, k = (jnp.asarray(rng.standard_normal((b, t, hk, d)), jnp.float32) for _ in "qk")
    v = jnp.asarray(rng.standard_normal((b, t, hv, d)), jnp.float32)
    g = jnp.asarray(-rng.uniform(0.01, 0.5, (b, t, hv)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.1, 0.9, (b, t, hv)), jnp.float32)

    def out(q, k, v, g, beta):
        return gated_delta_rule(q, k, v, g, beta, backend="chunked")[0]  # C = 64

    _, vjp = jax.vjp(out, q, k, v, g, beta)
    kept = sum(r.size for r in jax.tree.leaves(vjp)) / (b * (t // c) * hv * c * c)
    assert kept <= 12, kept


def test_bf16_inputs_stay_within_bf16_tolerance():
    seq_len = 150
    x = {k: jnp.asarray(v, jnp.bfloat16) for k, v in make_inputs(4, seq_len).items()}
    x["initial_state"] = x["initial_state"].astype(jnp.float32)
    seg = segment_ids(seq_len)
    out, state = jax.jit(gated_delta_rule)(**x, segment_ids=seg)
    # The oracle sees the same bf16-rounded inputs, so only compute and output rounding remain.
    out_ref, state_ref = gated_delta_rule_oracle(
        **{k: np.asarray(v, np.float64) for k, v in x.items()}, segment_ids=seg
    )
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert rel_err(out, out_ref) <= BF16_TOL
    assert rel_err(state, state_ref) <= ORACLE_TOL[np.float32]  # the state never left fp32


@pytest.mark.parametrize("options", [{}, {"use_qk_l2norm": False, "scale": 0.7}])
def test_decode_steps_equal_reference(options: dict):
    seq_len = 20
    x = make_inputs(5, seq_len, l2norm=options.get("use_qk_l2norm", True))
    out_ref, state_ref = gated_delta_rule(**x, backend="reference", **options)

    @jax.jit
    def decode(x):
        def step(state, token):
            out, state = gated_delta_step(*token, state, **options)
            return state, out

        tokens = [jnp.moveaxis(x[k], 1, 0) for k in ("q", "k", "v", "g", "beta")]
        state, out = jax.lax.scan(step, x["initial_state"], tokens)
        return jnp.moveaxis(out, 0, 1), state

    out, state = decode(x)
    assert rel_err(out, out_ref) <= 1e-6
    assert rel_err(state, state_ref) <= 1e-6


def _drop_last(a):
    return a[..., :-1]


BAD_SEQUENCE_INPUTS = [
    ("v", lambda v: v[:, :, :5], "multiple of q/k heads"),
    ("k", _drop_last, "k must have the shape of q"),
    ("g", lambda g: g[:, :, :4], "g must have shape"),
    ("beta", lambda b: b[:, :-1], "beta must have shape"),
    ("initial_state", _drop_last, "initial_state must have shape"),
    ("segment_ids", lambda s: s[:, :-1], "segment_ids must have shape"),
    ("q", lambda q: q[0], r"q must have shape \[B, T, Hk, dk\]"),
]


@pytest.mark.parametrize(("name", "corrupt", "message"), BAD_SEQUENCE_INPUTS)
def test_bad_shapes_raise(name: str, corrupt, message: str):
    x = make_inputs(6, 8)
    x["segment_ids"] = segment_ids(8)
    x[name] = corrupt(x[name])
    with pytest.raises(ValueError, match=message):
        gated_delta_rule(**x)


@pytest.mark.parametrize(
    ("name", "corrupt", "message"),
    [("state", _drop_last, "state must have shape"), ("g", _drop_last, "g must have shape")],
)
def test_decode_step_bad_shapes_raise(name: str, corrupt, message: str):
    x = {k: v[:, 0] for k, v in make_inputs(7, 1).items() if k != "initial_state"}
    x["state"] = make_inputs(7, 1)["initial_state"]
    x[name] = corrupt(x[name])
    with pytest.raises(ValueError, match=message):
        gated_delta_step(**x)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="valid: auto, reference, chunked"):
        gated_delta_rule(**make_inputs(8, 4), backend="triton")


@pytest.mark.parametrize(("dk", "dv", "expected"), [(24, 40, "pallas_gpu"), (24, 160, "chunked")])
def test_auto_falls_back_from_pallas_gpu_above_verified_head_dims(monkeypatch, dk, dv, expected):
    """On GPU "auto" means pallas_gpu, but not for head dims it was never verified at."""
    from qwenjax.kernels.gated_delta_rule import api

    called, reference = [], api._BACKENDS["reference"]

    def spy(name):
        return lambda *a, **kw: called.append(name) or reference(*a, **kw)

    monkeypatch.setattr(api, "_AUTO", {jax.default_backend(): "pallas_gpu"})
    monkeypatch.setattr(api, "_BACKENDS", {**api._BACKENDS, **{n: spy(n) for n in api._BACKENDS}})
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, 5, 2, dk))
    v = jax.random.normal(ks[1], (1, 5, 6, dv))
    gates = jax.nn.sigmoid(jax.random.normal(ks[2], (1, 5, 6)))
    gated_delta_rule(q, q, v, jnp.log(gates), gates)
    assert called == [expected]
