"""Pallas GPU (Triton) gated delta rule: interpreted on CPU vs the float64 oracle, VJPs, lowering.

Off GPU the kernels (UT transform, state pass forward and backward) run in the Pallas HLO
interpreter, so this is the kernel code the GPU runs. Sizes and tolerances: see `gdn_cases`; its
segments start on a chunk edge (64, also an edge of 32-token chunks) and one token after it.
test_gdn_pallas.py checks the VJP at the default launch options (one value and one key block);
here it is checked with several of each.
The lowering test traces the real Triton lowering for CUDA at the 27B layer geometry on this CPU,
which catches shapes and ops the Triton backend rejects; the compile test goes on to compile it
for an H100 without one (`qwenjax.kernels.gpu_target`), which catches what only Triton's and
XLA's GPU compilers see (shared memory over the limit, unsupported layouts). Speed is measured
on a GPU by benchmarks/gated_delta_rule.py, which also repeats the fp32 checks there.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.kernels.gated_delta_rule import gated_delta_rule
from qwenjax.kernels.gated_delta_rule.pallas_gpu import gated_delta_rule_pallas_gpu
from tests.kernels.gdn_cases import (
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
from tests.tpu_aot import compile_report, cuda_plugin_path, needs_cuda_plugin


@pytest.mark.parametrize(("seq_len", "block_v"), [(77, None), (130, 16)])
def test_interpreter_matches_oracle(seq_len: int, block_v):
    x, seg = make_inputs(seq_len, seq_len), segment_ids(seq_len)
    run = jax.jit(functools.partial(gated_delta_rule_pallas_gpu, block_v=block_v, interpret=True))
    out, state = run(**x, segment_ids=seg)
    out_ref, state_ref = gated_delta_rule_oracle(**x, segment_ids=seg)
    assert out.shape == (B, seq_len, HV, DV) and out.dtype == state.dtype == jnp.float32
    assert state.shape == (B, HV, DK, DV)
    assert rel_err(out, out_ref) <= ORACLE_TOL, f"out rel err {rel_err(out, out_ref):.2e}"
    assert rel_err(state, state_ref) <= ORACLE_TOL, f"state {rel_err(state, state_ref):.2e}"


def test_vjp_with_several_value_and_key_blocks():
    """block_v 16 splits the padded dv (64) into 4 value blocks and the padded dk (32) into 2 key
    blocks of the dq/dk/dw kernel; 32-token chunks give 5 chunks, one segment starting on a chunk
    edge. VJP w.r.t. every input vs autodiff of the token-serial reference."""
    seq_len = 130
    x, seg = make_inputs(5, seq_len), segment_ids(seq_len)
    rng = np.random.default_rng(6)
    cot = tuple(rng.standard_normal(s, np.float32) for s in ((B, seq_len, HV, DV), (B, HV, DK, DV)))
    options = {"block_v": 16, "chunk_size": 32, "interpret": True}
    kernels = functools.partial(gated_delta_rule_pallas_gpu, segment_ids=seg, **options)
    reference = functools.partial(gated_delta_rule, segment_ids=seg, backend="reference")

    @functools.partial(jax.jit, static_argnums=0)
    def vjp(fn, inputs):
        return jax.vjp(lambda kw: fn(**kw), inputs)[1](cot)[0]

    grads, grads_ref = vjp(kernels, x), vjp(reference, x)
    for name in x:
        err = rel_err(grads[name], grads_ref[name])
        assert err <= GRAD_TOL, f"d/d{name}: rel err {err:.2e}"


@pytest.mark.parametrize(
    ("options", "message"),
    [({"block_v": 24}, "block_v must be a power of two"), ({"chunk_size": 48}, "chunk_size")],
)
def test_bad_launch_options_raise(options, message):
    x = make_inputs(5, 20)
    with pytest.raises(ValueError, match=message):
        gated_delta_rule_pallas_gpu(**x, **options)


def test_lowers_to_triton_at_27b_geometry():
    """fwd + bwd at the 27B layer (Hk 16, Hv 48, d 128, T 4096, bf16) lower to seven Triton
    kernels for CUDA, each launched once: the UT transform and its backward, the state pass
    forward (sequential state_fwd, parallel out_fwd) and backward (dv_local, sequential
    state_bwd, dqkw)."""
    b, t, hk, hv, d = 1, 4096, 16, 48, 128
    spec = jax.ShapeDtypeStruct
    args = (
        spec((b, t, hk, d), jnp.bfloat16),
        spec((b, t, hk, d), jnp.bfloat16),
        spec((b, t, hv, d), jnp.bfloat16),
        spec((b, t, hv), jnp.float32),
        spec((b, t, hv), jnp.float32),
    )

    def loss(*a):
        out, state = gated_delta_rule(*a, backend="pallas_gpu")
        return out.astype(jnp.float32).sum() + state.sum()

    # value_and_grad: with grad alone, JAX drops out_fwd (O is not needed for the gradient).
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    text = grad.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    launched = sorted(re.findall(r'name = "gated_delta_rule_(\w+)"', text))
    kernels = ["dqkw", "dv_local", "out_fwd", "state_bwd", "state_fwd", "ut", "ut_bwd"]
    assert launched == kernels, f"Triton kernels in the CUDA lowering: {launched}"


COMPILE_FOR_H100 = """
import json, re, sys
import jax, jax.numpy as jnp
from benchmarks.decode_hlo import large_writes
from qwenjax.kernels.gated_delta_rule import gated_delta_rule
from qwenjax.kernels.gpu_target import h100_compile_only

sharding = jax.sharding.SingleDeviceSharding(h100_compile_only())
b, t, hk, hv, d = 1, int(sys.argv[1]), 16, 48, 128
bf16, f32 = jnp.bfloat16, jnp.float32
shapes = [((b, t, hk, d), bf16)] * 2 + [((b, t, hv, d), bf16)] + [((b, t, hv), f32)] * 2
args = [jax.ShapeDtypeStruct(s, dt, sharding=sharding) for s, dt in shapes]

cotangents = [jax.ShapeDtypeStruct(s, dt, sharding=sharding)
              for s, dt in (((b, t, hv, d), bf16), ((b, hv, d, d), f32))]

def fwd_bwd(*a):  # cotangents as inputs, as a training step has them
    outs, vjp = jax.vjp(lambda *x: gated_delta_rule(*x, backend="pallas_gpu"), *a[:5])
    return outs, vjp(a[5:])

compiled = jax.jit(fwd_bwd).lower(*args, *cotangents).compile()
hlo = compiled.as_text()
names = set(re.findall(r"gated_delta_rule_([a-z_]+)", hlo))
temp = compiled.memory_analysis().temp_size_in_bytes
xla_mib = sum(w["mib"] for w in large_writes(hlo, 0))
print(json.dumps({"kernels": sorted(names), "temp_bytes": temp, "xla_mib": xla_mib}))
"""


@needs_cuda_plugin
def test_compiles_for_h100_at_27b_geometry():
    """fwd + bwd at the 27B layer, bf16, T 4096, default launch options, compiled for an H100
    on this CPU (XLA deviceless: Triton compiles every kernel for sm_90a, and XLA checks each
    launch's shared memory against the 227 KB a block may have — e.g. block_v 128 at 3 stages
    fails here with "Shared memory size limit exceeded"). The temporaries stay O(T·d) plus
    per-chunk states: under 1 GiB (measured 536 MiB). Around the kernels XLA writes little
    (measured 43 MiB): v, the output and their gradients are not transposed for the kernels,
    nor the UT kernel's cotangents upcast (507 MiB when they were), and the l2norm and query
    scale happen in the kernels, so no normalised q, k is written (123 MiB when it was)."""
    report = compile_report(COMPILE_FOR_H100, 4096, pythonpath=cuda_plugin_path())
    kernels = {"dqkw", "dv_local", "out_fwd", "state_bwd", "state_fwd", "ut", "ut_bwd"}
    assert kernels <= set(report["kernels"]), report["kernels"]
    assert report["temp_bytes"] < 2**30, report
    assert report["xla_mib"] < 80, report
