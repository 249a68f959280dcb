"""Pallas TPU gated delta rule: interpreted on CPU vs the float64 oracle, VJPs, AOT TPU compiles.

Off TPU the kernel bodies run in Pallas interpret mode: `interpret=True` picks the TPU interpreter
(`pltpu.InterpretParams`), the dispatch's default the HLO interpreter; both are checked. Errors
are relative to the largest magnitude of the expected tensor: max|a - b| / max|b|. Sizes are odd:
T = 77 and 130 are not multiples of the chunk (64), Hv / Hk = 3 with two key heads (so the key
head index maps and the backward's in-kernel sum over grouped heads are exercised), dk = 24 !=
dv = 40 (padded to 128 lanes outside the kernels), a nonzero initial state and several segments
per row. The AOT test compiles the real Mosaic kernels, forward and backward, for TPU v5p and v6e
at the 27B layer geometry.
"""

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.kernels.gated_delta_rule.pallas_tpu import gated_delta_rule_pallas_tpu
from qwenjax.kernels.gated_delta_rule.reference import gated_delta_rule_reference
from tests.kernels.gdn_cases import (
    DK,
    DV,
    HV,
    ORACLE_TOL,
    B,
    make_inputs,
    rel_err,
    segment_ids,
)
from tests.oracles.gdn import gated_delta_rule_oracle
from tests.tpu_aot import compile_report, needs_libtpu

# fp32 kernel gradients vs float64 autodiff: measured <= 3e-6 here, so 1e-5 (tighter than
# gdn_cases.GRAD_TOL, which bounds fp32 against fp32 across backends).
FP32_GRAD_TOL = 1e-5


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


def _values_and_vjp(fn, inputs: dict, cotangents: tuple):
    outputs, vjp = jax.vjp(lambda kw: fn(**kw), inputs)
    return outputs, vjp(cotangents)[0]


@functools.cache
def _vjp_case(seq_len: int):
    """Inputs, segment ids, random cotangents on out and final state (float64), and the VJP of
    the token-serial reference in float64: shared by both interpret modes."""
    x, seg = make_inputs(seq_len + 1, seq_len), segment_ids(seq_len)
    rng = np.random.default_rng(seq_len)
    cot = (rng.standard_normal((B, seq_len, HV, DV)), rng.standard_normal((B, HV, DK, DV)))
    with jax.enable_x64():
        x64 = {name: np.asarray(value, np.float64) for name, value in x.items()}
        reference = functools.partial(gated_delta_rule_reference, segment_ids=seg)
        _, grads_ref = jax.jit(functools.partial(_values_and_vjp, reference))(x64, cot)
    return x, seg, cot, jax.tree.map(np.asarray, grads_ref)


@pytest.mark.parametrize("interpret", [True, None], ids=["tpu_interpreter", "dispatch"])
@pytest.mark.parametrize("seq_len", [77, 130])
def test_vjp_matches_float64_reference(seq_len: int, interpret: bool | None):
    """The backward kernel's VJP w.r.t. q, k, v, g, beta and the initial state, for random
    cotangents on the output and the final state, vs autodiff of the token-serial reference in
    float64; the differentiated forward (which also saves the per-chunk states) vs the oracle."""
    x, seg, cot, grads_ref = _vjp_case(seq_len)
    kernel = functools.partial(gated_delta_rule_pallas_tpu, segment_ids=seg, interpret=interpret)
    cot32 = tuple(c.astype(np.float32) for c in cot)
    (out, state), grads = jax.jit(functools.partial(_values_and_vjp, kernel))(x, cot32)
    out_ref, state_ref = gated_delta_rule_oracle(**x, segment_ids=seg)
    assert rel_err(out, out_ref) <= ORACLE_TOL, f"out rel err {rel_err(out, out_ref):.2e}"
    assert rel_err(state, state_ref) <= ORACLE_TOL, f"state {rel_err(state, state_ref):.2e}"
    for name, value in x.items():
        assert grads[name].dtype == value.dtype and grads[name].shape == value.shape
        err = rel_err(grads[name], grads_ref[name])
        assert err <= FP32_GRAD_TOL, f"d/d{name}: rel err {err:.2e}"


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

        def loss(*args):
            out, state = f(*args)
            return out.astype(jnp.float32).sum() + state.sum()

        def stats(fn):
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile()
            mem = compiled.memory_analysis()
            return {
                "compile_s": time.perf_counter() - start,
                "mosaic_calls": compiled.as_text().count('custom_call_target="tpu_custom_call"'),
                **{
                    name: getattr(mem, name + "_in_bytes")
                    for name in ("argument_size", "output_size", "temp_size", "generated_code_size")
                },
            }

        # fwd_bwd: the gradient w.r.t. q, k, v, g, beta and the initial state.
        report[t] = {"fwd": stats(f), "fwd_bwd": stats(jax.grad(loss, argnums=tuple(range(6))))}
    print(json.dumps(report))
    """
)


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_compiles_for_tpu_topology_at_27b_geometry(topology: str):
    seq_lens = (4096, 32768)
    report = compile_report(_AOT_SCRIPT, topology, *seq_lens)
    hk, hv, d = 16, 48, 128
    state_bytes = hv * d * d * 4
    for t in seq_lens:
        fwd, fwd_bwd = report[str(t)]["fwd"], report[str(t)]["fwd_bwd"]
        # One Mosaic call forward; under jax.grad the forward that saves the per-chunk states and
        # the backward (a dispatch that lowered the interpreter would have none).
        assert fwd["mosaic_calls"] == 1 and fwd_bwd["mosaic_calls"] == 2, report[str(t)]
        # q, k, v bf16 + g, beta fp32 + segment ids int32 + the fp32 state; out bf16 + state
        # (plus a few bytes of tuple index table); the gradients of all but the segment ids.
        arg_bytes = t * (2 * hk * d * 2 + hv * d * 2 + 2 * hv * 4 + 4) + state_bytes
        assert fwd["argument_size"] == pytest.approx(arg_bytes, abs=1024)
        assert fwd["output_size"] == pytest.approx(t * hv * d * 2 + state_bytes, abs=1024)
        assert fwd_bwd["argument_size"] == pytest.approx(arg_bytes, abs=1024)
        assert fwd_bwd["output_size"] == pytest.approx(arg_bytes - 4 * t, abs=1024)
        # Forward: the only temporaries are the gate / reset rearrangements, O(T * Hv) fp32: no
        # copies of q, k, v or the output, no O(T * C) or per-chunk-state intermediates.
        gate_bytes = 4 * (2 * t * hv * 4)
        assert fwd["temp_size"] <= gate_bytes
        # Forward + backward: the per-chunk states [Hv, T / 64, d, d] fp32 (the residuals), the
        # fp32 gradients of the normalised q and k [T, Hk * d], the bf16 output [T, Hv * d] and
        # the gate rearrangements; nothing [T, Hv, d] in fp32, nothing O(T * C).
        chunk_states = hv * (t // 64) * d * d * 4
        assert fwd_bwd["temp_size"] <= chunk_states + t * (2 * hk * d * 4 + hv * d * 2) + gate_bytes
