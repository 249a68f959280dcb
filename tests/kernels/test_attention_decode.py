"""Attention over a KV cache (`cache_attention`) and its Pallas decode kernels, GPU (Triton) and
TPU (Mosaic): interpreted on CPU vs a float64 oracle, rows independent of their batch, blocks
past a row's keys never read, the dispatch, the tiny model's decode and the serving scheduler on
them (also on a tensor-parallel mesh), and compiles for an H100 and for v5p / v6e at the 27B
decode geometry.

Cases: GQA 6:2 (G = 3), one query a row (decoding) and three (speculative verification at
consecutive positions), caches whose length is not a multiple of the block (GPU: 64 keys, the
last block read clamped to the cache's end; TPU: 512, the edge block's tail undefined), shorter
than a block (S = 40), and long enough for three GPU splits of 1024 keys and three TPU blocks
(S = 1500, 2500), with rows at position 0, at the last slot and in between. The TPU kernel also
runs on the TPU interpreter, which fills uninitialised VMEM with NaN and checks block bounds.
fp32: <= 1e-5 of the float64 oracle (measured ~1e-7 to 1e-6).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax
from qwenjax.kernels.attention import (
    attention,
    auto_backend,
    cache_attention,
    decode_pallas_gpu,
    decode_pallas_tpu,
)
from qwenjax.model.cache import init_cache
from qwenjax.serve.scheduler import Scheduler
from tests.conftest import rel_err
from tests.kernels.test_attention import oracle
from tests.scheduler_cases import SCHEDULER, assert_scheduler_gives, mesh_model, tiny_requests
from tests.tpu_aot import compile_report, cuda_plugin_path, needs_cuda_plugin, needs_libtpu

N, K = 6, 2


def case(b: int, t: int, s: int, h: int, seed: int, last: list[int] | None = None):
    """q `[B, T, N, H]`, caches `[B, K, S, H]` and query positions ending at `last[b]`."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, N, h)).astype(np.float32)
    k, v = (rng.standard_normal((b, K, s, h)).astype(np.float32) for _ in range(2))
    last = rng.integers(t - 1, s, b) if last is None else np.asarray(last)
    positions = (last[:, None] - t + 1 + np.arange(t)).astype(np.int32)  # [B, T]
    return q, k, v, positions


def expected(q, k, v, positions):
    """The float64 oracle (which takes keys `[B, S, K, H]`) on caches `[B, K, S, H]`."""
    b, _, s, _ = k.shape
    k, v = np.swapaxes(k, 1, 2), np.swapaxes(v, 1, 2)
    slots = np.broadcast_to(np.arange(s), (b, s))
    return oracle(q, k, v, positions, slots, None, None, causal=True, scale=q.shape[-1] ** -0.5)


KERNELS = {
    "gpu": decode_pallas_gpu.decode_attention_pallas_gpu,  # Triton on CUDA, else interpreted
    "tpu": decode_pallas_tpu.decode_attention_pallas_tpu,  # Mosaic on TPU, else interpreted
    "tpu_interpreter": lambda *a, **kw: decode_pallas_tpu.decode_attention_pallas_tpu(
        *a, **kw, interpret=True
    ),
}
BLOCKS = {"gpu": decode_pallas_gpu.BLOCK, "tpu": decode_pallas_tpu.BLOCK}


def kernel(name, q, k, v, positions, layer=1):
    """The kernel on caches k, v put at `layer` of stacks of 3 layers whose others are NaN: a
    read of the wrong layer shows."""

    def stack(c):
        out = np.full((3, *c.shape), np.nan, c.dtype)
        out[layer] = c
        return out

    scale = q.shape[-1] ** -0.5
    run = jax.jit(lambda *a: KERNELS[name](*a[:4], q_positions=a[4], scale=scale))
    args = (q, stack(k), stack(v), np.int32(layer), positions)
    return np.asarray(run(*map(jnp.asarray, args)))


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize(
    ("b", "t", "s", "h", "last"),
    [
        (4, 1, 77, 32, [0, 76, 63, 64]),  # a row at slot 0, the last slot, a block's edges
        (3, 3, 40, 16, [2, 39, 20]),  # S below one block; verification of 3 tokens
        (3, 1, 1500, 32, [1499, 511, 700]),  # three TPU blocks, the last one partly past S
        (3, 1, 2500, 32, [2499, 1023, 1500]),  # three GPU splits, rows ending in each
    ],
)
def test_decode_kernel_matches_float64_oracle(name, b, t, s, h, last):
    q, k, v, positions = case(b, t, s, h, seed=s + t, last=last)
    got = kernel(name, q, k, v, positions, layer=t % 3)  # layer 1 or 0 of the stack
    assert got.shape == q.shape and got.dtype == np.float32
    err = rel_err(got, expected(q, k, v, positions))
    assert err <= 1e-5, err


@pytest.mark.parametrize("name", ["gpu", "tpu"])
def test_rows_do_not_depend_on_their_batch_and_never_read_past_their_keys(name):
    """Row 1 alone, and next to other rows, gives the same bits; cache slots from the first
    whole block past its last position on are NaN and never touched (the xla path would return
    NaN: it multiplies every slot's value by a zero probability)."""
    s, h = 1300, 32
    q, k, v, positions = case(3, 1, s, h, seed=5, last=[1299, 70, 700])
    block = BLOCKS[name]
    end = -(-(int(positions[1, -1]) + 1) // block) * block  # GPU: 2 blocks of 64; TPU: 1 of 512
    k[1, :, end:], v[1, :, end:] = np.nan, np.nan
    together = kernel(name, q, k, v, positions)
    alone = kernel(name, q[1:2], k[1:2], v[1:2], positions[1:2])
    others = [2, 1, 0]
    shuffled = kernel(name, q[others], k[others], v[others], positions[others])
    assert np.isfinite(together).all()
    np.testing.assert_array_equal(alone[0], together[1])
    np.testing.assert_array_equal(shuffled[1], together[1])
    want = expected(q[1:2], k[1:2, :, :end], v[1:2, :, :end], positions[1:2])
    assert rel_err(alone, want) <= 1e-5


def test_cache_attention_dispatch(monkeypatch):
    """A kernel backend (asked for, or pinned for "auto") reaches its kernel when it can take the
    call and falls back to the xla math otherwise (the GPU kernel at head dim 24); "auto" alone
    keeps the xla path; fused-only and unknown backends are refused, and "pallas_tpu" is refused
    for self attention and, pinned, leaves it to "auto"."""
    calls = []
    for module, name in ((decode_pallas_gpu, "gpu"), (decode_pallas_tpu, "tpu")):
        real = getattr(module, f"decode_attention_pallas_{name}")

        def spy(*a, real=real, name=name, **kw):
            calls.append((name, a[0].shape[-1]))
            return real(*a, **kw)

        monkeypatch.setattr(module, f"decode_attention_pallas_{name}", spy)
    for h in (16, 24):
        q, k, v, positions = map(jnp.asarray, case(2, 1, 50, h, seed=h))
        want = expected(q, k, v, positions)
        for kernel_name in ("pallas_gpu", "pallas_tpu"):
            for backend, pin in ((kernel_name, None), ("auto", kernel_name), ("auto", None)):
                with auto_backend(pin) if pin else contextlib.nullcontext():
                    got = cache_attention(q, k, v, q_positions=positions, backend=backend)
                assert rel_err(got, want) <= 1e-5
    assert calls == [("gpu", 16)] * 2 + [("tpu", 16)] * 2 + [("tpu", 24)] * 2
    for bad in ("cudnn", "splash", "flash"):
        with pytest.raises(ValueError, match="cache attention backend"):
            cache_attention(q, k, v, q_positions=positions, backend=bad)
    pos = jnp.broadcast_to(jnp.arange(50), (2, 50))
    self_attention = {"q_positions": pos, "kv_positions": pos, "positions_in_order": True}
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # self attention's [B, T, K, H]
    with pytest.raises(ValueError, match="pallas_tpu attention runs over a KV cache"):
        attention(k.repeat(3, 2), k, v, backend="pallas_tpu", **self_attention)
    with auto_backend("pallas_tpu"):
        pinned = attention(k.repeat(3, 2), k, v, **self_attention)
    assert rel_err(pinned, attention(k.repeat(3, 2), k, v, backend="xla", **self_attention)) < 1e-6


@pytest.mark.parametrize("backend", ["xla", "pallas_gpu", "pallas_tpu"])
def test_cache_attention_reads_one_layer_of_a_stack(backend):
    """`layer=` reads that layer of stacked caches `[L, B, K, S, H]` (the others NaN) as the
    same call on the lone cache does; mis-shaped caches are refused naming the shapes."""
    q, k, v, positions = map(jnp.asarray, case(2, 3, 45, 16, seed=9))
    nan = jnp.full_like(k, jnp.nan)
    stack = lambda c: jnp.stack([nan, nan, c, nan])
    got = cache_attention(q, stack(k), stack(v), q_positions=positions, layer=2, backend=backend)
    want = cache_attention(q, k, v, q_positions=positions, backend=backend)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert rel_err(want, expected(q, k, v, positions)) <= 1e-5
    with pytest.raises(ValueError, match=r"\[L, B, K, S, H\] stacks.*\(2, 45, 16\)"):
        cache_attention(q, k[0], v[0], q_positions=positions, layer=0, backend=backend)
    with pytest.raises(ValueError, match=r"must be \[B, K, S, H\]"):
        cache_attention(q, stack(k), stack(v), q_positions=positions, backend=backend)


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_model_decode_and_verification_match_xla_attention(backend):
    """The tiny model's prefill (xla), then a decode step and a 3-token verification with the
    cache attention pinned to a kernel (interpreted) or "xla": hidden states <= 1e-4 of their
    largest magnitude (rows of different lengths, fp32)."""
    config = qwenjax.ModelConfig.from_preset("tiny")
    model = qwenjax.build(config, dtype=jnp.float32, seed=3)
    rng = np.random.default_rng(8)
    ids = lambda t: jnp.asarray(rng.integers(0, config.vocab_size, (2, t)), jnp.int32)
    step, verify = ids(1), ids(3)
    cache = init_cache(config, 2, 101, jnp.float32)
    _, cache, _ = jax.jit(model.extend)(ids(70), cache, jnp.asarray([70, 45], jnp.int32))

    def decode(cache):
        one, cache, _ = model.extend(step, cache)
        three, _, _ = model.extend(verify, cache)
        return one, three

    results = {}
    for pin in (backend, "xla"):
        with auto_backend(pin):  # traced inside the block: a new function, a fresh trace
            results[pin] = jax.jit(lambda cache: decode(cache))(cache)
    for got, want in zip(results[backend], results["xla"], strict=True):
        assert rel_err(got, want) <= 1e-4, rel_err(got, want)


COMPILE = """
import json, re, sys
import jax, jax.numpy as jnp
from jax.experimental import topologies
from qwenjax.kernels.attention import cache_attention
from qwenjax.kernels.gpu_target import h100_compile_only

target, t, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if target == "h100":
    device = h100_compile_only()
else:
    device = topologies.get_topology_desc(target, platform="tpu").devices[0]
sharding = jax.sharding.SingleDeviceSharding(device)
b, s, n, kv, h = 32, 32784, 24, 4, 256
spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
args = [spec((b, t, n, h), jnp.bfloat16)] + [spec((b, kv, s, h), jnp.bfloat16)] * 2
fn = lambda q, k, v, p: cache_attention(q, k, v, q_positions=p, backend=backend)
compiled = jax.jit(fn).lower(*args, spec((b, t), jnp.int32)).compile()
names = set(re.findall(r"decode_attention_(triton|mosaic)", compiled.as_text()))
temp = compiled.memory_analysis().temp_size_in_bytes
print(json.dumps({"kernels": sorted(names), "temp_bytes": temp}))
"""


@needs_cuda_plugin
@pytest.mark.parametrize("t", [1, 3])
def test_compiles_for_h100_at_27b_decode_geometry(t):
    """32 slots of a 32K cache (S = 32784, not a multiple of the block), 24 : 4 heads, head dim
    256, bf16, one query a row and a 3-token verification: Triton compiles the kernel for an
    H100 on this CPU. Temporaries are the splits' partial outputs, never an [S]-long array per
    head: under 256 MiB (33 splits x 32 rows x 4 heads x 16 or 32 query rows x 256 fp32)."""
    report = compile_report(COMPILE, "h100", t, "pallas_gpu", pythonpath=cuda_plugin_path())
    assert report["kernels"] == ["triton"], report
    assert report["temp_bytes"] < 2**28, report


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_scheduler_with_the_kernel_equals_offline_generate(backend):
    """The serving scheduler (4 slots, chunked prefill, MTP speculation: decode steps and
    3-token verifications on the kernel, interpreted) gives offline `generate`'s greedy tokens
    (xla attention) for more requests than slots, of different lengths."""
    config, prompts, expected = tiny_requests(6, lengths=(21, 4, 37, 9, 30))
    model = qwenjax.build(config, dtype=jnp.float32, seed=4)
    with auto_backend(backend):
        scheduler = Scheduler(model, **SCHEDULER)
    assert_scheduler_gives(scheduler, prompts, expected)


@needs_libtpu
@pytest.mark.parametrize(("topology", "t"), [("v5p:2x2x1", 3), ("v6e:2x2", 1)])
def test_compiles_for_tpu_at_27b_decode_geometry(topology, t):
    """32 slots of a 32K cache (S = 32784, a multiple of `SLOT_MULTIPLE` as `init_cache` makes
    it, not of the block), 24 : 4 heads, head dim 256, bf16: Mosaic compiles the kernel for a
    v5p (3-token verification) and a v6e (decoding). Temporaries stay small (measured 0 to
    6 MiB): the cache is read in place, never copied to another layout (at S = 32774 XLA's
    default layout put K minor of S: 4 GiB of copies)."""
    report = compile_report(COMPILE, topology, t, "pallas_tpu")
    assert report["kernels"] == ["mosaic"], report
    assert report["temp_bytes"] < 2**24, report


def test_scheduler_on_a_tensor_parallel_mesh_with_the_tpu_kernel():
    """On 8 CPU devices as fsdp 4 x tensor 2 (heads split: one kv head a device, the kernel
    inside `shard_map`), the scheduler with the TPU kernel (interpreted) and MTP speculation
    gives single-device offline `generate`'s greedy tokens."""
    config, prompts, expected = tiny_requests(5)
    model, mesh = mesh_model(config)
    with auto_backend("pallas_tpu"):
        scheduler = Scheduler(model, **SCHEDULER, **mesh)
    assert_scheduler_gives(scheduler, prompts, expected)
