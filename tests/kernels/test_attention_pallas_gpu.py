"""The "pallas_gpu" attention backend (JAX's Pallas Triton flash attention, segment ids in-kernel):
interpreted on CPU vs float64 references, and compiled for an H100 without one.

Off GPU the kernels run in the Pallas interpreter (the backend's `platform_dependent` default).
Cases are test_attention_splash's: GQA 6:2 (K/V repeated to the query heads), head dim 48
(padded to 64 inside the kernel), fp32. T = 100 with packed documents (padded to 128: two
query and key blocks of 64, a padded tail) and T = 64 causal only. Values <= 1e-5 of the float64
oracle, gradients <= 1e-4 of float64 autodiff of the reference attention (measured 1e-7, 5e-7).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwenjax
from qwenjax.kernels.attention import attention, auto_backend
from tests.conftest import rel_err
from tests.kernels.test_attention import oracle
from tests.kernels.test_attention_splash import H, case, reference_grads
from tests.tpu_aot import compile_report, cuda_plugin_path, needs_cuda_plugin


@pytest.mark.parametrize(("t", "packed"), [(100, True), (64, False)])
def test_pallas_gpu_attention_matches_float64_references(t, packed):
    x, kw = case(t, packed, seed=t + 7)
    cot = np.random.default_rng(t).standard_normal(x["q"].shape).astype(np.float32)
    run = functools.partial(attention, backend="pallas_gpu", **kw)

    def loss(q, k, v):
        out = run(q, k, v)
        return jnp.sum(out * cot), out

    args = [jnp.asarray(x[name]) for name in ("q", "k", "v")]
    grads, out = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(*args)
    expected = oracle(
        **x, q_pos=kw["q_positions"], kv_pos=kw["kv_positions"], q_seg=kw.get("q_segment_ids"),
        kv_seg=kw.get("kv_segment_ids"), causal=True, scale=H**-0.5,
    )  # fmt: skip
    assert out.shape == x["q"].shape and out.dtype == jnp.float32
    assert rel_err(out, expected) <= 1e-5, rel_err(out, expected)
    for name, got, want in zip("qkv", grads, reference_grads(x, kw, cot), strict=True):
        assert rel_err(got, want) <= 1e-4, f"d{name}: {rel_err(got, want):.2e}"


def test_pallas_gpu_refuses_decoding_over_a_cache():
    x, kw = case(16, False, seed=0)
    kw["positions_in_order"] = False
    with pytest.raises(ValueError, match="pallas_gpu backend needs causal self attention"):
        attention(x["q"], x["k"], x["v"], backend="pallas_gpu", **kw)


COMPILE_FOR_H100 = """
import json, re, sys
import jax, jax.numpy as jnp
from qwenjax.kernels.attention import attention
from qwenjax.kernels.gpu_target import h100_compile_only

sharding = jax.sharding.SingleDeviceSharding(h100_compile_only())
b, t, n, kv, h = 1, int(sys.argv[1]), 24, 4, 256
spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
args = [spec((b, t, n, h), jnp.bfloat16)] + [spec((b, t, kv, h), jnp.bfloat16)] * 2
segments = spec((b, t), jnp.int32)

def loss(q, k, v, seg):
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    out = attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                    kv_segment_ids=seg, positions_in_order=True, backend="pallas_gpu")
    return out.astype(jnp.float32).sum()

compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args, segments).compile()
names = set(re.findall(r"(mha_[a-z_]+)", compiled.as_text()))
temp = compiled.memory_analysis().temp_size_in_bytes
print(json.dumps({"kernels": sorted(names), "temp_bytes": temp}))
"""


@needs_cuda_plugin
def test_compiles_for_h100_at_27b_geometry():
    """fwd + bwd with packed documents at the 27B attention (24 : 4 heads, head dim 256, bf16,
    T 4096) compile for an H100 on this CPU: Triton fits the 64 x 64 blocks in shared memory
    (the kernels' default 128-query blocks do not). Temporaries stay O(T): the repeated K/V and
    their gradients, under 0.5 GiB (measured 0.28 GiB), never a [T, T] mask."""
    report = compile_report(COMPILE_FOR_H100, 4096, pythonpath=cuda_plugin_path())
    assert {"mha_forward", "mha_backward"} <= set(report["kernels"]), report["kernels"]
    assert report["temp_bytes"] < 2**29, report


def test_model_logits_and_gradients_match_xla_attention():
    """The tiny model (its attention layers: packed documents, positions in order) with the
    attention pinned to "pallas_gpu" (interpreted) equals it pinned to "xla": logits <= 1e-4 of
    their largest magnitude, every parameter gradient <= 1e-3 (the GDN layers run "chunked" in
    both)."""
    config = qwenjax.ModelConfig.from_preset("tiny")
    model = qwenjax.build(config, dtype=jnp.float32, seed=4)
    rng = np.random.default_rng(12)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (2, 83)), jnp.int32)
    seg = jnp.asarray([[0] * 30 + [1] * 53, [0] * 61 + [1] * 22], jnp.int32)
    graphdef, params = nnx.split(model)

    def loss(params):
        logits = nnx.merge(graphdef, params)(ids, segment_ids=seg)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)), logits

    results = {}
    for backend in ("pallas_gpu", "xla"):
        with auto_backend(backend):  # traced inside the block: a fresh jit per backend
            results[backend] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    (_, logits), grads = results["pallas_gpu"]
    (_, logits_ref), grads_ref = results["xla"]
    assert rel_err(logits, logits_ref) <= 1e-4, f"logits {rel_err(logits, logits_ref):.2e}"
    flat, flat_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    worst = max(rel_err(g, r) for g, r in zip(flat, flat_ref, strict=True) if np.any(r))
    assert worst <= 1e-3, f"worst parameter gradient rel err {worst:.2e}"
