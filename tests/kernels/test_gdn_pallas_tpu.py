"""Pallas TPU gated delta rule: interpreted on CPU vs the float64 oracle, VJPs, AOT TPU compiles.

Off TPU the kernel body runs in Pallas interpret mode: `interpret=True` picks the TPU interpreter
(`pltpu.InterpretParams`), the dispatch's default the HLO interpreter; both are checked. Errors
are relative to the largest magnitude of the expected tensor: max|a - b| / max|b|. Sizes are odd:
T = 77 and 130 are not multiples of the chunk (64), Hv / Hk = 3 with two key heads (so the key
head index map is exercised), dk = 24 != dv = 40 (padded to 128 lanes outside the kernel).
The AOT test compiles the real Mosaic kernel for TPU v5p and v6e at the 27B layer geometry.
"""

import functools
import importlib.util
import json
import os
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.kernels.gated_delta_rule import gated_delta_rule
from qwenjax.kernels.gated_delta_rule.pallas_tpu import gated_delta_rule_pallas_tpu
from tests.oracles.gdn import gated_delta_rule_oracle

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


def make_inputs(seed: int, seq_len: int, l2norm: bool = True) -> dict:
    """Fresh random fp32 inputs with a nonzero initial state; decays log-uniform in [-3, -1e-3]
    so slow heads carry state across chunks and segment resets visibly matter."""
    rng = np.random.default_rng(seed)
    qk_std = 1.0 if l2norm else DK**-0.5  # near unit norm keeps the rule stable without l2norm
    return {
        "q": (qk_std * rng.standard_normal((B, seq_len, HK, DK))).astype(np.float32),
        "k": (qk_std * rng.standard_normal((B, seq_len, HK, DK))).astype(np.float32),
        "v": rng.standard_normal((B, seq_len, HV, DV)).astype(np.float32),
        "g": -np.exp(rng.uniform(np.log(1e-3), np.log(3.0), (B, seq_len, HV))).astype(np.float32),
        "beta": rng.uniform(0.05, 0.95, (B, seq_len, HV)).astype(np.float32),
        "initial_state": rng.standard_normal((B, HV, DK, DV)).astype(np.float32),
    }


@pytest.mark.parametrize("seq_len", [77, 130])
def test_tpu_interpreter_matches_oracle(seq_len: int):
    x, seg = make_inputs(seq_len, seq_len), segment_ids(seq_len)
    run = jax.jit(functools.partial(gated_delta_rule_pallas_tpu, interpret=True))
    out, state = run(**x, segment_ids=seg)
    out_ref, state_ref = gated_delta_rule_oracle(**x, segment_ids=seg)
    assert out.shape == (B, seq_len, HV, DV) and out.dtype == state.dtype == jnp.float32
    assert state.shape == (B, HV, DK, DV)
    assert rel_err(out, out_ref) <= ORACLE_TOL, f"out rel err {rel_err(out, out_ref):.2e}"
    assert rel_err(state, state_ref) <= ORACLE_TOL, f"state {rel_err(state, state_ref):.2e}"


def test_dispatch_values_and_vjp_match_oracle_and_reference():
    """backend="pallas_tpu" through the dispatch: values vs the oracle, the VJP w.r.t. every
    differentiable input (random cotangents on out and final state) vs autodiff of the reference."""
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

    (out, state), grads = values_and_vjp(x, "pallas_tpu")
    _, grads_ref = values_and_vjp(x, "reference")
    out_ref, state_ref = gated_delta_rule_oracle(**x, segment_ids=seg)
    assert rel_err(out, out_ref) <= ORACLE_TOL, f"out rel err {rel_err(out, out_ref):.2e}"
    assert rel_err(state, state_ref) <= ORACLE_TOL, f"state {rel_err(state, state_ref):.2e}"
    for name in x:
        err = rel_err(grads[name], grads_ref[name])
        assert err <= GRAD_TOL, f"d/d{name}: rel err {err:.2e}"


def test_no_segments_no_initial_state_and_options():
    """The optional inputs absent (None through the custom VJP too), no l2norm, explicit scale."""
    seq_len, options = 77, {"use_qk_l2norm": False, "scale": 0.7}
    x = make_inputs(3, seq_len, l2norm=False)
    del x["initial_state"]
    fn = functools.partial(gated_delta_rule, backend="pallas_tpu", **options)
    out, state = jax.jit(fn)(**x)
    out_ref, state_ref = gated_delta_rule_oracle(**x, **options)
    assert rel_err(out, out_ref) <= ORACLE_TOL
    assert rel_err(state, state_ref) <= ORACLE_TOL
    loss = lambda q, k: jnp.sum(fn(q, k, x["v"], x["g"], x["beta"])[0] ** 2)
    ref = functools.partial(gated_delta_rule, backend="reference", **options)
    loss_ref = lambda q, k: jnp.sum(ref(q, k, x["v"], x["g"], x["beta"])[0] ** 2)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(x["q"], x["k"])
    grads_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(x["q"], x["k"])
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(grad, grad_ref) <= GRAD_TOL


def test_bf16_inputs_stay_within_bf16_tolerance():
    seq_len = 77
    x = {k: jnp.asarray(v, jnp.bfloat16) for k, v in make_inputs(4, seq_len).items()}
    x["initial_state"] = x["initial_state"].astype(jnp.float32)
    seg = segment_ids(seq_len)
    out, state = jax.jit(functools.partial(gated_delta_rule, backend="pallas_tpu"))(
        **x, segment_ids=seg
    )
    # The oracle sees the same bf16-rounded inputs, so only compute and output rounding remain.
    out_ref, state_ref = gated_delta_rule_oracle(
        **{k: np.asarray(v, np.float64) for k, v in x.items()}, segment_ids=seg
    )
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    assert rel_err(out, out_ref) <= BF16_TOL
    assert rel_err(state, state_ref) <= ORACLE_TOL  # the state never left fp32


# Runs in a fresh `JAX_PLATFORMS=cpu` process: the TPU topology comes from libtpu, and the
# dispatch's platform_dependent must pick Mosaic because the lowering platform is TPU.
_AOT_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding
    from qwenjax.kernels.gated_delta_rule import gated_delta_rule

    topology, seq_lens = sys.argv[1], [int(t) for t in sys.argv[2:]]
    device = topologies.get_topology_desc(topology, platform="tpu").devices[0]
    sharding = SingleDeviceSharding(device)
    b, hk, hv, d = 1, 16, 48, 128  # the 27B GatedDeltaNet layer
    report = {"device_kind": device.device_kind}
    for t in seq_lens:
        spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        # q, k, v as the model holds them, [B, T, heads * d] (a split of the conv output), so
        # the reshapes around the call are free; see pallas_tpu.py on 4-D operands.
        args = (
            spec((b, t, hk * d), jnp.bfloat16), spec((b, t, hk * d), jnp.bfloat16),
            spec((b, t, hv * d), jnp.bfloat16), spec((b, t, hv), jnp.float32),
            spec((b, t, hv), jnp.float32), spec((b, hv, d, d), jnp.float32),
            spec((b, t), jnp.int32),
        )

        def f(q, k, v, g, beta, state, seg):
            heads = lambda x: x.reshape(b, t, -1, d)
            out, state = gated_delta_rule(
                heads(q), heads(k), heads(v), g, beta, initial_state=state, segment_ids=seg,
                backend="pallas_tpu",
            )
            return out.reshape(b, t, hv * d), state

        start = time.perf_counter()
        compiled = jax.jit(f).lower(*args).compile()
        mem = compiled.memory_analysis()
        report[t] = {
            "compile_s": time.perf_counter() - start,
            "mosaic": "tpu_custom_call" in compiled.as_text(),
            **{
                name: getattr(mem, name + "_in_bytes")
                for name in ("argument_size", "output_size", "temp_size", "generated_code_size")
            },
        }
    print(json.dumps(report))
    """
)

_LIBTPU = importlib.util.find_spec("libtpu") is not None
_LINUX_X86 = sys.platform == "linux" and platform.machine() == "x86_64"


@pytest.mark.skipif(
    not _LIBTPU and not _LINUX_X86, reason="libtpu (jax[tpu]) only exists for Linux x86-64"
)
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_compiles_for_tpu_topology_at_27b_geometry(topology: str):
    seq_lens = (4096, 32768)
    # ALLOW_MULTIPLE_LIBTPU_LOAD: another process (e.g. `qwenjax plan`) may hold libtpu's
    # lockfile; compiling for a described topology touches no TPU, so sharing is safe.
    # XLA_FLAGS: conftest.py sets CPU test flags (optimisation level 0) that must not reach the
    # TPU compiler.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    cmd = [sys.executable, "-c", _AOT_SCRIPT, topology, *map(str, seq_lens)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(topology, json.dumps(report, indent=1))
    for t in seq_lens:
        stats = report[str(t)]
        assert stats["mosaic"], "the dispatch lowered the interpreter, not the Mosaic kernel"
        # q, k, v bf16 + g, beta fp32 + segment ids int32 + the fp32 state; out bf16 + state
        # (plus a few bytes of tuple index table).
        state_bytes = 48 * 128 * 128 * 4
        arg_bytes = t * (2 * 16 * 128 * 2 + 48 * 128 * 2 + 2 * 48 * 4 + 4) + state_bytes
        assert stats["argument_size"] == pytest.approx(arg_bytes, abs=1024)
        assert stats["output_size"] == pytest.approx(t * 48 * 128 * 2 + state_bytes, abs=1024)
        # The only temporaries are the gate / reset rearrangements, O(T * Hv) fp32: no copies of
        # q, k, v or the output, no O(T * C) or per-chunk-state intermediates.
        assert stats["temp_size"] <= 4 * (2 * t * 48 * 4)
