"""The "splash" attention backend (JAX's Mosaic TPU flash kernels): interpreted on CPU vs float64
references, the model's attention layer under a tensor-parallel mesh, AOT compiles for TPU.

Off TPU the kernels run in the Pallas interpreter (the backend's `platform_dependent` default).
Errors are max |a - b| / max |b|. Sizes are odd: T = 300 in blocks of 128 (padded to 384: three
query and key blocks, so the causal block skipping and the padding are both exercised) and
T = 77 with the default blocks (shrunk to one block of 128); GQA 6:2 (two kv heads, so the
kernel's kv-head index map matters); head dim 48; documents that start inside blocks.

References: the float64 NumPy oracle of test_attention.py for values; for gradients, autodiff of
the reference attention (`backend="xla"`) run in float64. fp32 (T = 300, packed): values
<= 1e-5, gradients <= 1e-4 (measured 2e-7, 7e-7). bf16 (T = 77, one document; inputs, output and
cotangent in bf16, fp32 softmax inside): values and gradients <= 1e-2 (measured 5e-3, 6e-3; the
xla backend in bf16 is 4e-3, 4e-3).
"""

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.config import ModelConfig
from qwenjax.kernels.attention import attention, auto_backend
from qwenjax.kernels.attention.splash import BlockSizes, default_block_sizes, fit_blocks
from qwenjax.model.attention import GatedAttention
from qwenjax.model.context import Context
from qwenjax.model.rope import rope_tables
from qwenjax.model.transformer import positions_from_segments
from tests.conftest import rel_err
from tests.kernels.test_attention import oracle
from tests.tpu_aot import compile_report, needs_libtpu

B, N, K, H = 2, 6, 2, 48
BLOCKS_128 = BlockSizes(*[128] * 8)


def case(t: int, packed: bool, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    x = {
        "q": rng.standard_normal((B, t, N, H)).astype(np.float32),
        "k": rng.standard_normal((B, t, K, H)).astype(np.float32),
        "v": rng.standard_normal((B, t, K, H)).astype(np.float32),
    }
    pos = np.broadcast_to(np.arange(t), (B, t))
    kw = {"q_positions": pos, "kv_positions": pos, "positions_in_order": True}
    if packed:  # row 0: two documents, row 1: three, boundaries inside blocks
        seg = np.zeros((B, t), np.int32)
        seg[0, 2 * t // 5 :], seg[1, t // 8 :], seg[1, 5 * t // 6 :] = 1, 1, 2
        kw.update(q_segment_ids=seg, kv_segment_ids=seg)
    return x, kw


def reference_grads(x: dict, kw: dict, cot: np.ndarray) -> tuple[np.ndarray, ...]:
    """d(sum(out * cot)) / d(q, k, v) through the reference attention, in float64."""
    with jax.enable_x64(True):
        as64 = [jnp.asarray(x[name], jnp.float64) for name in ("q", "k", "v")]

        def loss(q, k, v):
            return jnp.sum(attention(q, k, v, backend="xla", **kw) * cot)

        return tuple(np.asarray(g) for g in jax.jit(jax.grad(loss, (0, 1, 2)))(*as64))


def splash_grads(x: dict, kw: dict, cot: np.ndarray, dtype, blocks) -> tuple:
    run = functools.partial(attention, backend="splash", splash_block_sizes=blocks, **kw)

    def loss(q, k, v):
        out = run(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    args = [jnp.asarray(x[name], dtype) for name in ("q", "k", "v")]
    grads, out = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(*args)
    return out, grads


@pytest.mark.parametrize(
    ("t", "packed", "dtype", "tol"),
    [
        (300, True, jnp.float32, (1e-5, 1e-4)),
        (77, False, jnp.bfloat16, (1e-2, 1e-2)),
    ],
)
def test_splash_matches_float64_references(t, packed, dtype, tol):
    x, kw = case(t, packed, seed=t)
    cot = np.random.default_rng(t + 1).standard_normal(x["q"].shape).astype(np.float32)
    blocks = BLOCKS_128 if t == 300 else None  # T = 77: defaults, shrunk to one 128-block
    out, grads = splash_grads(x, kw, cot, dtype, blocks)
    assert out.shape == x["q"].shape and out.dtype == dtype
    segs = (kw.get("q_segment_ids"), kw.get("kv_segment_ids"))
    want = oracle(
        **x, q_pos=kw["q_positions"], kv_pos=kw["kv_positions"], q_seg=segs[0], kv_seg=segs[1],
        causal=True, scale=H**-0.5,
    )  # fmt: skip
    assert rel_err(out, want) <= tol[0], f"out {rel_err(out, want):.2e}"
    for name, got, ref in zip("qkv", grads, reference_grads(x, kw, cot), strict=True):
        assert rel_err(got, ref) <= tol[1], f"d{name} {rel_err(got, ref):.2e}"


@pytest.mark.parametrize(
    ("t", "blocks", "want_t", "want_block"),
    [
        (77, default_block_sizes(77), 128, 128),  # short: every block shrinks to 128
        (4096, default_block_sizes(4096), 4096, 512),
        (4097, default_block_sizes(4097), 4608, 512),  # padded by less than one block
        (32768, default_block_sizes(32768), 32768, 1024),
        (300, BlockSizes(*[128] * 7, 256), 512, 128),  # the LCM of mixed sizes
    ],
)
def test_block_fitting_pads_to_whole_blocks(t, blocks, want_t, want_block):
    fitted, tp = fit_blocks(t, blocks)
    assert (tp, fitted.block_q) == (want_t, want_block)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"causal": False}, "causal=False"),
        ({"positions_in_order": False}, "positions_in_order=False"),
        ({"decode": True}, "T=5, S=40"),
        ({"splash_block_sizes": BlockSizes(*[100] * 8)}, "multiples of 128"),
        ({"splash_block_sizes": BlockSizes(*[128] * 6, use_fused_bwd_kernel=True)}, "unfused"),
    ],
)
def test_splash_rejects_calls_it_cannot_take(kw, match):
    x, base = case(40, packed=False, seed=0)
    if kw.pop("decode", False):  # 5 queries at later positions over a 40-token cache
        x["q"], base["q_positions"] = x["q"][:, :5], base["q_positions"][:, 30:35]
    with pytest.raises(ValueError, match=match):
        attention(**x, **{**base, **kw}, backend="splash")


def test_auto_on_cpu_lowers_the_fallback_only():
    """Head dim 128 and causal self attention: "auto" stages splash for TPU, but lowered for CPU
    it is exactly the xla backend (no Mosaic call, the same values)."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 64, 2, 128)).astype(np.float32) for _ in range(3))
    _, kw = case(64, packed=True, seed=5)
    kw = {name: a[:1] for name, a in kw.items() if name != "positions_in_order"}
    auto = jax.jit(functools.partial(attention, positions_in_order=True, **kw))
    assert "platform_index" in str(jax.make_jaxpr(auto)(q, k, v))  # both branches staged
    assert "tpu_custom_call" not in auto.lower(q, k, v).compile().as_text()
    xla = jax.jit(functools.partial(attention, positions_in_order=True, backend="xla", **kw))
    np.testing.assert_array_equal(auto(q, k, v), xla(q, k, v))


needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS in tests/conftest.py)"
)


@needs_8_devices
def test_model_attention_layer_on_fsdp_tensor_mesh_matches_xla():
    """The tiny model's gated attention layer on fsdp=4 x tensor=2: the splash kernel runs per
    shard inside `shard_kernel` (one row, 2 of 4 query heads, 1 of 2 kv heads) and equals the
    xla backend, values <= 1e-5 and gradients (input and every parameter) <= 1e-4."""
    config = ModelConfig.from_preset("tiny")
    layer = GatedAttention(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    rng = np.random.default_rng(2)
    t = 40
    x = jnp.asarray(rng.standard_normal((4, t, config.hidden_size)), jnp.float32)
    seg = np.zeros((4, t), np.int32)
    seg[:, 13:], seg[2:, 29:] = 1, 2
    seg = jnp.asarray(seg)
    cos, sin = rope_tables(config, positions_from_segments(seg), jnp.float32)
    ctx = Context(cos, sin, jnp.broadcast_to(jnp.arange(t), (4, t)), seg)
    cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    mesh = ax.make_mesh(ax.MeshConfig(fsdp=4, tensor=2))

    def loss(params, x):
        with ax.use_rules(mesh, ax.FSDP_TP_RULES):
            out = nnx.merge(graphdef, params)(x, ctx)
        return jnp.sum(out * cot), out

    def run(backend):
        with auto_backend(backend):  # traced inside the block: a fresh jit per backend
            traced = jax.jit(jax.grad(loss, (0, 1), has_aux=True)).trace(params, x)
        return traced.lower().compile()(params, x), str(traced.jaxpr)

    ((g_params, g_x), out), jaxpr = run("splash")
    ((g_params_ref, g_x_ref), out_ref), jaxpr_ref = run("xla")
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr and "pallas_call" not in jaxpr_ref
    assert rel_err(out, out_ref) <= 1e-5, f"out {rel_err(out, out_ref):.2e}"
    assert rel_err(g_x, g_x_ref) <= 1e-4, f"dx {rel_err(g_x, g_x_ref):.2e}"
    pairs = zip(jax.tree.leaves(g_params), jax.tree.leaves(g_params_ref), strict=True)
    assert max(rel_err(a, b) for a, b in pairs) <= 1e-4


# Runs in a fresh `JAX_PLATFORMS=cpu` process: the TPU topology comes from libtpu. The 27B
# attention layer's kernel call, forward and backward (a VJP with a bf16 cotangent), packed.
# T = 4096 by "auto", whose platform_dependent must pick splash because the lowering platform is
# TPU, and must not keep the O(T^2) residuals of its xla fallback; T = 32768 by "splash".
_AOT_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding
    from qwenjax.kernels.attention import attention

    topology, runs = sys.argv[1], [(int(t), b) for t, b in zip(sys.argv[2::2], sys.argv[3::2])]
    device = topologies.get_topology_desc(topology, platform="tpu").devices[0]
    sharding = SingleDeviceSharding(device)
    b, n, kh, h = 1, 24, 4, 256  # the 27B gated attention layer
    report = {"device_kind": device.device_kind}
    for t, backend in runs:
        spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        q, kv = spec((b, t, n, h), jnp.bfloat16), spec((b, t, kh, h), jnp.bfloat16)
        args = (q, kv, kv, spec((b, t), jnp.int32), q)

        def f(q, k, v, seg, cot):
            pos = jnp.broadcast_to(jnp.arange(t), (b, t))
            run = lambda q, k, v: attention(
                q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                kv_segment_ids=seg, positions_in_order=True, backend=backend,
            )
            out, vjp = jax.vjp(run, q, k, v)
            return out, *vjp(cot)

        start = time.perf_counter()
        compiled = jax.jit(f).lower(*args).compile()
        mem = compiled.memory_analysis()
        report[t] = {
            "backend": backend,
            "compile_s": round(time.perf_counter() - start, 1),
            "mosaic_calls": compiled.as_text().count("custom_call_target=\\"tpu_custom_call\\""),
            "arguments": mem.argument_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
            "temps": mem.temp_size_in_bytes,
        }
    print(json.dumps(report))
    """
)


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_compiles_for_tpu_topology_at_27b_geometry(topology: str):
    # Both lengths on v5p; v6e at 4096 only (the kernel is the same, the long compile is not).
    runs = {4096: "auto", 32768: "splash"} if topology.startswith("v5p") else {4096: "auto"}
    report = compile_report(_AOT_SCRIPT, topology, *[a for run in runs.items() for a in run])
    for t in runs:
        stats = report[str(t)]
        # Forward, dq and dkv kernels: Mosaic, not the interpreter or an XLA fallback.
        assert stats["mosaic_calls"] == 3, stats
        # q, k, v, the cotangent (k and v: 4 of q's 24 heads each) and int32 segment ids in;
        # out, dq, dk, dv out.
        q_bytes = t * 24 * 256 * 2
        assert stats["arguments"] == pytest.approx(q_bytes * 7 / 3 + 4 * t, abs=1024)
        assert stats["outputs"] == pytest.approx(q_bytes * 7 / 3, abs=1024)
        # O(T * d): the [N, T, H] transposes of q, out and dq, splash's logsumexp residual
        # ([N, T, 128] fp32, the size of q) and O(T) mask tables fit in 5x the bytes of q
        # (measured 1.0-4.0x). One [T, T] bf16 logits tile of one head alone is 2 GiB at
        # T = 32768, 5.3x the bytes of q.
        assert stats["temps"] <= 5 * q_bytes, stats
