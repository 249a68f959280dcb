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
import pytest

from qwenjax.kernels.gated_delta_rule.pallas_tpu import gated_delta_rule_pallas_tpu
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
