"""`gated_delta_decode`: a few tokens of the gated delta rule from a given state (decoding,
speculative verification), on the jnp path and on the Pallas decode kernels, GPU (Triton) and
TPU (Mosaic), interpreted on CPU; the dispatch; the tiny model's decode, verification and
serving scheduler on them (also on a tensor-parallel mesh); and compiles for an H100 and for
v5p / v6e at the 27B decode geometry, updating the state in place.

Cases: Hv / Hk = 3, T = 1 (decoding), 3 and 5 (verification of 2 and 4 drafts), odd batch,
value dims spanning several GPU value blocks, with and without the fused l2norm, a custom scale,
bf16 values, and padding tokens (g = beta = 0) that must leave the state as it is. fp32 kernels
vs the float64 NumPy oracle: <= 1e-5 (measured ~2e-7).
"""

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax
from qwenjax.inference.engine import Engine
from qwenjax.inference.sampling import SamplingParams
from qwenjax.kernels.gated_delta_rule import api as gdn_api
from qwenjax.kernels.gated_delta_rule import auto_backend, decode_pallas_tpu, gated_delta_decode
from qwenjax.serve.scheduler import Scheduler
from tests.conftest import rel_err
from tests.kernels import gdn_cases
from tests.oracles.gdn import gated_delta_rule_oracle
from tests.scheduler_cases import SCHEDULER, assert_scheduler_gives, mesh_model, tiny_requests
from tests.tpu_aot import compile_report, cuda_plugin_path, needs_cuda_plugin, needs_libtpu

TOL = 1e-5
# "xla": the jnp decode as this platform runs it (on CPU the state copied out and advanced by
# `gated_delta_step` or the token-serial scan); "xla_in_stack" and "xla_stack": its TPU / GPU
# form (`delta_rule_steps_by_sums`), forced here, on a lone state and on one layer's state
# inside a stack (the model's decode path there).
BACKENDS = ["xla", "xla_in_stack", "xla_stack", "pallas_gpu", "pallas_tpu", "tpu_interpreter"]


def make_inputs(seed: int, b: int, t: int, e: int, h: int, l2norm: bool = True) -> dict:
    """`gdn_cases.make_inputs` (Hk = 2, Hv = 6) with the initial state as "state"."""
    x = gdn_cases.make_inputs(seed, t, l2norm, batch=b, dk=e, dv=h)
    x["state"] = x.pop("initial_state")
    return x


def decode(name: str, x: dict, **options):
    """`gated_delta_decode` on backend `name` ("tpu_interpreter": the TPU kernel on the TPU
    interpreter, NaN-filled VMEM and bounds checks; "xla_stack": the state as layer 1 of a
    stack whose layer 0 is NaN; "xla_in_stack" and "xla_stack" in the in-stack form), jitted
    with the state donated."""
    if name == "tpu_interpreter":

        def fn(q, k, v, g, beta, state):
            q, k = gdn_api.prepare_qk(
                q, k, options.get("scale"), options.get("use_qk_l2norm", True)
            )
            o, stack = decode_pallas_tpu.gated_delta_decode_pallas_tpu(
                q, k, v, g, beta, state[None], 0, interpret=True
            )
            return o, stack[0]
    elif name == "xla_stack":

        def fn(q, k, v, g, beta, state):
            stack = jnp.stack([jnp.full_like(state, jnp.nan), state])
            o, stack = gated_delta_decode(
                q, k, v, g, beta, stack, layer=1, backend="xla", **options
            )
            return o, stack[1]
    else:
        backend = "xla" if name == "xla_in_stack" else name
        fn = lambda *a: gated_delta_decode(*a, backend=backend, **options)
    args = [jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "beta")] + [jnp.array(x["state"])]
    forced = name in ("xla_in_stack", "xla_stack")
    with in_stack_on_cpu() if forced else contextlib.nullcontext():
        return jax.jit(fn, donate_argnums=5)(*args)


def in_stack_on_cpu():
    """The in-stack form of the jnp decode (TPU and GPU only) also on CPU, at trace time."""
    return mock.patch.object(gdn_api, "STEPS_IN_STACK_PLATFORMS", ("cpu",))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(
    ("b", "t", "e", "h", "options"),
    [
        (3, 1, 16, 32, {}),  # decoding; two GPU value blocks of 16
        (3, 3, 32, 64, {}),  # verifying two drafts; four value blocks
        (1, 5, 16, 16, {"use_qk_l2norm": False, "scale": 0.3}),
    ],
)
def test_decode_matches_float64_oracle(name, b, t, e, h, options):
    x = make_inputs(b * 10 + t, b, t, e, h, l2norm=options.get("use_qk_l2norm", True))
    out, state = decode(name, x, **options)
    want_out, want_state = gated_delta_rule_oracle(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["state"], **options
    )
    assert out.dtype == jnp.float32 and state.dtype == jnp.float32
    assert out.shape == want_out.shape and state.shape == want_state.shape
    assert rel_err(out, want_out) <= TOL
    assert rel_err(state, want_state) <= TOL


@pytest.mark.parametrize("name", BACKENDS)
def test_padding_tokens_leave_the_state_and_bf16_values(name):
    """Rows whose last tokens are padding (g = beta = 0, as the model masks them) end in the
    state after their valid tokens only; bf16 values give bf16 outputs within bf16 rounding."""
    x = make_inputs(7, 2, 4, 16, 32)
    x["g"][0, 2:] = x["beta"][0, 2:] = 0.0  # row 0: two valid tokens
    x["v"] = np.asarray(jnp.asarray(x["v"], jnp.bfloat16).astype(jnp.float32))
    out, state = decode(name, {**x, "v": jnp.asarray(x["v"], jnp.bfloat16)})
    assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    short = {n: a[:1, :2] for n, a in x.items() if n != "state"}
    _, want_row0 = gated_delta_rule_oracle(**short, initial_state=x["state"][:1])
    assert rel_err(state[0], want_row0[0]) <= TOL
    want_out, want_state = gated_delta_rule_oracle(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["state"]
    )
    assert rel_err(state, want_state) <= TOL
    assert rel_err(out, want_out) <= 1e-2  # bf16 output rounding (2**-9)


@pytest.mark.parametrize("name", ["xla", "pallas_gpu", "pallas_tpu"])
def test_a_layer_of_a_stack_advances_in_place(name):
    """With `layer`, the state is the blocks' stacked states (as the model's scan carries it):
    `state[layer]` advances as it does alone (1e-6) and the other layers keep their bits, with
    the stack donated under jit."""
    x = make_inputs(11, 3, 3, 16, 32)
    rng = np.random.default_rng(12)
    stack = rng.standard_normal((4, *x["state"].shape)).astype(np.float32)
    args = [jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "beta")]
    alone = gated_delta_decode(*args, jnp.asarray(stack[2]), backend=name)
    step = jax.jit(
        lambda *a: gated_delta_decode(*a[:6], layer=a[6], backend=name), donate_argnums=5
    )
    out, new = step(*args, jnp.asarray(stack), jnp.int32(2))
    assert rel_err(out, alone[0]) <= 1e-6  # two programs: XLA may fuse them differently
    assert rel_err(new[2], alone[1]) <= 1e-6
    np.testing.assert_array_equal(np.asarray(new)[[0, 1, 3]], stack[[0, 1, 3]])
    with pytest.raises(ValueError, match=r"state must have shape \(4, 3, 6, 16, 32\)"):
        gated_delta_decode(*args, jnp.asarray(stack[:, :, :5]), layer=0, backend=name)


@pytest.mark.parametrize("extra", [0, 1])
def test_stacked_jnp_decode_on_either_side_of_its_token_limit(extra):
    """Up to `STEPS_IN_STACK_MAX_TOKENS` tokens the in-stack jnp decode unrolls its closed form
    (no loop); one more runs the token-serial scan on a copy of the layer's state. Both match
    the oracle. On CPU, by default, the copy at any T (the in-stack form was slower there)."""
    t = gdn_api.STEPS_IN_STACK_MAX_TOKENS + extra
    x = make_inputs(21 + extra, 2, t, 16, 16)
    x["g"][1, t - 2 :] = x["beta"][1, t - 2 :] = 0.0  # padding
    out, state = decode("xla_stack", x)
    want_out, want_state = gated_delta_rule_oracle(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["state"]
    )
    assert rel_err(out, want_out) <= TOL and rel_err(state, want_state) <= TOL
    args = [jnp.asarray(x[n]) for n in ("q", "k", "v", "g", "beta")] + [x["state"][None]]
    fresh = lambda: lambda *a: gated_delta_decode(*a, layer=0)  # a new function: a new trace
    loops = lambda: " while(" in jax.jit(fresh()).lower(*args).compile().as_text()
    with in_stack_on_cpu():
        assert loops() == bool(extra)
    assert loops()


def _has_pallas_call(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_dispatch_and_errors():
    """ "auto" is the jnp path unpinned, and the platform's decode kernel when the rule is pinned
    to a Pallas backend (the GPU one only for head dims it takes); bad input names the problem."""
    x = {n: jnp.asarray(a) for n, a in make_inputs(3, 2, 3, 16, 32).items()}
    args = [x[n] for n in ("q", "k", "v", "g", "beta", "state")]
    fresh = lambda: lambda *a: gated_delta_decode(*a)  # a new function: a new trace
    assert not _has_pallas_call(fresh(), *args)
    for pin in ("pallas_gpu", "pallas_tpu"):
        with auto_backend(pin):
            assert _has_pallas_call(fresh(), *args), pin
    with auto_backend("chunked"):
        assert not _has_pallas_call(fresh(), *args)
    odd = {n: jnp.asarray(a) for n, a in make_inputs(3, 2, 3, 24, 40).items()}
    odd_args = [odd[n] for n in ("q", "k", "v", "g", "beta", "state")]
    with auto_backend("pallas_gpu"):
        assert not _has_pallas_call(fresh(), *odd_args)  # E = 24: not a power of two
    with pytest.raises(ValueError, match="power-of-two"):
        gated_delta_decode(*odd_args, backend="pallas_gpu")
    with pytest.raises(ValueError, match="unknown gated delta decode backend 'chunked'"):
        gated_delta_decode(*args, backend="chunked")
    with pytest.raises(ValueError, match=r"state must have shape \(2, 6, 16, 32\)"):
        gated_delta_decode(*args[:5], args[5][:, :, :8])
    with pytest.raises(ValueError, match=r"g must have shape \(2, 3, 6\)"):
        gated_delta_decode(*args[:3], args[3][:, :2], *args[4:])


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_scheduler_with_the_kernel_equals_offline_generate(backend):
    """The serving scheduler with the rule pinned to a Pallas backend (4 slots, chunked prefill,
    MTP speculation: decode steps, 3-token verifications and their commits on the decode
    kernel, interpreted) gives offline `generate`'s greedy tokens on the jnp path, for more
    requests than slots, of different lengths."""
    config, prompts, expected = tiny_requests(6, lengths=(21, 4, 37, 9, 30))
    model = qwenjax.build(config, dtype=jnp.float32, seed=4)
    with auto_backend(backend):
        scheduler = Scheduler(model, **SCHEDULER)
    assert_scheduler_gives(scheduler, prompts, expected)


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_speculative_generate_logprobs_match_the_jnp_path(backend):
    """Offline MTP generation with the decode kernel (interpreted) gives the jnp path's tokens,
    log-probabilities and acceptance. The random tiny model's log-probabilities are flat, so
    the bound is tight: 2e-6 relative (measured 8e-8; a kernel whose delta is 0.1% off gives
    1.5e-5, and the same greedy tokens)."""
    config = qwenjax.ModelConfig.from_preset("tiny")
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (21, 4, 37, 9, 30)]
    model = qwenjax.build(config, dtype=jnp.float32, seed=2)
    params = [SamplingParams(temperature=0.0, logprobs=True)] * len(prompts)
    run = lambda: Engine(model).decode(prompts, params, max_new_tokens=6, num_speculative_tokens=2)
    want = run()
    with auto_backend(backend):
        got = run()
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.acceptance_rate == want.acceptance_rate
    assert rel_err(got.logprobs, want.logprobs) <= 2e-6


def test_scheduler_on_a_tensor_parallel_mesh_with_the_tpu_kernel(monkeypatch):
    """On 8 CPU devices as fsdp 4 x tensor 2 (GDN heads split over tensor), the scheduler with
    the TPU decode kernel and MTP speculation gives single-device offline `generate`'s greedy
    tokens, and every call of the kernel, the commit of accepted drafts included, is traced
    inside `shard_map`: on a TPU, XLA cannot partition a Mosaic call (interpreted on CPU, it
    would pass unsharded)."""
    kernel, manual = decode_pallas_tpu.gated_delta_decode_pallas_tpu, []

    def recording(*args, **kwargs):
        manual.append(jax.sharding.get_abstract_mesh().manual_axes)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(decode_pallas_tpu, "gated_delta_decode_pallas_tpu", recording)
    config, prompts, expected = tiny_requests(5)
    model, mesh = mesh_model(config)
    with auto_backend("pallas_tpu"):
        scheduler = Scheduler(model, **SCHEDULER, **mesh)
    assert_scheduler_gives(scheduler, prompts, expected)
    assert len(manual) >= 2 and all(manual), manual  # decode, verify and commit traces


COMPILE = r"""
import json, re, sys
import jax, jax.numpy as jnp
from jax.experimental import topologies
from qwenjax.kernels.gated_delta_rule import gated_delta_decode
from qwenjax.kernels.gpu_target import h100_compile_only

target, t, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if target == "h100":
    device = h100_compile_only()
else:
    device = topologies.get_topology_desc(target, platform="tpu").devices[0]
sharding = jax.sharding.SingleDeviceSharding(device)
b, hk, hv, d = 32, 16, 48, 128
spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
args = [spec((b, t, hk, d), jnp.bfloat16)] * 2 + [spec((b, t, hv, d), jnp.bfloat16)]
args += [spec((b, t, hv), jnp.float32)] * 2 + [spec((b, hv, d, d), jnp.float32)]
fn = lambda *a: gated_delta_decode(*a, backend=backend)
compiled = jax.jit(fn, donate_argnums=5).lower(*args).compile()
names = set(re.findall(r"gated_delta_decode_(triton|mosaic)", compiled.as_text()))
memory = compiled.memory_analysis()
print(json.dumps({"kernels": sorted(names), "temp_bytes": memory.temp_size_in_bytes,
                  "alias_bytes": memory.alias_size_in_bytes}))
"""
STATE_BYTES = 32 * 48 * 128 * 128 * 4  # 96 MiB: one layer's fp32 state for 32 rows


@needs_cuda_plugin
@pytest.mark.parametrize("t", [1, 3])
def test_compiles_for_h100_at_27b_decode_geometry(t):
    """32 rows, 16 : 48 heads of dim 128, bf16 inputs, decoding and a 3-token verification:
    Triton compiles the kernel for an H100 on this CPU, the donated state is updated in place
    (aliased, not copied) and the temporaries are the small operands, never a state copy."""
    report = compile_report(COMPILE, "h100", t, "pallas_gpu", pythonpath=cuda_plugin_path())
    assert report["kernels"] == ["triton"], report
    assert report["alias_bytes"] == STATE_BYTES, report
    assert report["temp_bytes"] < STATE_BYTES // 8, report


@needs_libtpu
@pytest.mark.parametrize(("topology", "t"), [("v5p:2x2x1", 3), ("v6e:2x2", 1)])
def test_compiles_for_tpu_at_27b_decode_geometry(topology, t):
    """The same for Mosaic on a v5p (verification) and a v6e (decoding): in place, with
    temporaries of the small operands only (measured 0 to 9 MiB)."""
    report = compile_report(COMPILE, topology, t, "pallas_tpu")
    assert report["kernels"] == ["mosaic"], report
    assert report["alias_bytes"] == STATE_BYTES, report
    assert report["temp_bytes"] < STATE_BYTES // 8, report
