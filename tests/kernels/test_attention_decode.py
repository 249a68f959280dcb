"""Attention over a KV cache (`cache_attention`) and its Pallas GPU decode kernel: interpreted on
CPU vs a float64 oracle, rows independent of their batch, blocks past a row's keys never read,
the dispatch, the tiny model's decode, and an H100 compile at the 27B decode geometry.

Cases: GQA 6:2 (G = 3), one query a row (decoding) and three (speculative verification at
consecutive positions), caches whose length is not a multiple of the 64-key block (the last block
is read clamped to the cache's end), shorter than a block (S = 40: 32-key blocks), and long
enough for three 1024-key splits (S = 2500), with rows at position 0, at the last slot and in
between. fp32: <= 1e-5 of the float64 oracle (measured ~3e-7).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax
from qwenjax.inference.engine import generate
from qwenjax.inference.sampling import SamplingParams
from qwenjax.kernels.attention import api, auto_backend, cache_attention
from qwenjax.kernels.attention.decode_pallas_gpu import BLOCK, decode_attention_pallas_gpu
from qwenjax.model.cache import init_cache
from qwenjax.serve.scheduler import Scheduler
from tests.conftest import rel_err
from tests.kernels.test_attention import oracle
from tests.tpu_aot import compile_report, cuda_plugin_path, needs_cuda_plugin

N, K = 6, 2


def case(b: int, t: int, s: int, h: int, seed: int, last: list[int] | None = None):
    """q `[B, T, N, H]`, caches `[B, S, K, H]` and query positions ending at `last[b]`."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, N, h)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, K, h)).astype(np.float32) for _ in range(2))
    last = rng.integers(t - 1, s, b) if last is None else np.asarray(last)
    positions = (last[:, None] - t + 1 + np.arange(t)).astype(np.int32)  # [B, T]
    return q, k, v, positions


def expected(q, k, v, positions):
    b, s = k.shape[:2]
    slots = np.broadcast_to(np.arange(s), (b, s))
    return oracle(q, k, v, positions, slots, None, None, causal=True, scale=q.shape[-1] ** -0.5)


def kernel(q, k, v, positions):
    scale = q.shape[-1] ** -0.5
    run = jax.jit(lambda *a: decode_attention_pallas_gpu(*a[:3], q_positions=a[3], scale=scale))
    return np.asarray(run(*map(jnp.asarray, (q, k, v, positions))))


@pytest.mark.parametrize(
    ("b", "t", "s", "h", "last"),
    [
        (4, 1, 77, 32, [0, 76, 63, 64]),  # a row at slot 0, the last slot, a block's edges
        (3, 3, 40, 16, [2, 39, 20]),  # S below one block; verification of 3 tokens
        (3, 1, 2500, 32, [2499, 1023, 1500]),  # three splits, rows ending in each
    ],
)
def test_decode_kernel_matches_float64_oracle(b, t, s, h, last):
    q, k, v, positions = case(b, t, s, h, seed=s + t, last=last)
    got = kernel(q, k, v, positions)
    assert got.shape == q.shape and got.dtype == np.float32
    err = rel_err(got, expected(q, k, v, positions))
    assert err <= 1e-5, err


def test_rows_do_not_depend_on_their_batch_and_never_read_past_their_keys():
    """Row 1 alone, and next to other rows, gives the same bits; cache slots from the first
    whole block past its last position on are NaN and never touched (the xla path would return
    NaN: it multiplies every slot's value by a zero probability)."""
    s, h = 300, 32
    q, k, v, positions = case(3, 1, s, h, seed=5, last=[299, 70, 180])
    end = -(-(int(positions[1, -1]) + 1) // BLOCK) * BLOCK  # 128: two blocks read
    k[1, end:], v[1, end:] = np.nan, np.nan
    together = kernel(q, k, v, positions)
    alone = kernel(q[1:2], k[1:2], v[1:2], positions[1:2])
    others = [2, 1, 0]
    shuffled = kernel(q[others], k[others], v[others], positions[others])
    assert np.isfinite(together).all()
    np.testing.assert_array_equal(alone[0], together[1])
    np.testing.assert_array_equal(shuffled[1], together[1])
    want = expected(q[1:2, :, :, :], k[1:2, :end], v[1:2, :end], positions[1:2])
    assert rel_err(alone, want) <= 1e-5


def test_cache_attention_dispatch(monkeypatch):
    """ "pallas_gpu" (asked for, or pinned for "auto") reaches the kernel when it can take the
    call and falls back to the xla math otherwise (head dim 24); "auto" alone keeps the xla path;
    fused-only and unknown backends are refused."""
    calls = []
    real = api.decode_pallas_gpu.decode_attention_pallas_gpu
    monkeypatch.setattr(
        api.decode_pallas_gpu,
        "decode_attention_pallas_gpu",
        lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw),
    )
    for h in (16, 24):
        q, k, v, positions = map(jnp.asarray, case(2, 1, 50, h, seed=h))
        want = expected(q, k, v, positions)
        for backend, pin in (("pallas_gpu", None), ("auto", "pallas_gpu"), ("auto", None)):
            with auto_backend(pin) if pin else contextlib.nullcontext():
                got = cache_attention(q, k, v, q_positions=positions, backend=backend)
            assert rel_err(got, want) <= 1e-5
    assert calls == [(2, 1, N, 16)] * 2
    for bad in ("cudnn", "splash", "flash"):
        with pytest.raises(ValueError, match="cache attention backend"):
            cache_attention(q, k, v, q_positions=positions, backend=bad)


def test_model_decode_and_verification_match_xla_attention():
    """The tiny model's prefill (xla), then a decode step and a 3-token verification with the
    cache attention pinned to "pallas_gpu" (interpreted) or "xla": hidden states <= 1e-4 of
    their largest magnitude (rows of different lengths, fp32)."""
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
    for backend in ("pallas_gpu", "xla"):
        with auto_backend(backend):  # traced inside the block: a new function, a fresh trace
            results[backend] = jax.jit(lambda cache: decode(cache))(cache)
    for got, want in zip(results["pallas_gpu"], results["xla"], strict=True):
        assert rel_err(got, want) <= 1e-4, rel_err(got, want)


COMPILE_FOR_H100 = """
import json, re, sys
import jax, jax.numpy as jnp
from qwenjax.kernels.attention import cache_attention
from qwenjax.kernels.gpu_target import h100_compile_only

sharding = jax.sharding.SingleDeviceSharding(h100_compile_only())
b, t, s, n, kv, h = 32, int(sys.argv[1]), 32774, 24, 4, 256
spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
args = [spec((b, t, n, h), jnp.bfloat16)] + [spec((b, s, kv, h), jnp.bfloat16)] * 2
fn = lambda q, k, v, p: cache_attention(q, k, v, q_positions=p, backend="pallas_gpu")
compiled = jax.jit(fn).lower(*args, spec((b, t), jnp.int32)).compile()
names = set(re.findall(r"(decode_attention)", compiled.as_text()))
temp = compiled.memory_analysis().temp_size_in_bytes
print(json.dumps({"kernels": sorted(names), "temp_bytes": temp}))
"""


@needs_cuda_plugin
@pytest.mark.parametrize("t", [1, 3])
def test_compiles_for_h100_at_27b_decode_geometry(t):
    """32 slots of a 32K cache (S = 32774, not a multiple of the block), 24 : 4 heads, head dim
    256, bf16, one query a row and a 3-token verification: Triton compiles the kernel for an
    H100 on this CPU. Temporaries are the splits' partial outputs, never an [S]-long array per
    head: under 256 MiB (33 splits x 32 rows x 4 heads x 16 or 32 query rows x 256 fp32)."""
    report = compile_report(COMPILE_FOR_H100, t, pythonpath=cuda_plugin_path())
    assert report["kernels"] == ["decode_attention"], report
    assert report["temp_bytes"] < 2**28, report


def test_scheduler_with_the_kernel_equals_offline_generate():
    """The serving scheduler (4 slots, chunked prefill, MTP speculation: decode steps and
    3-token verifications on the kernel, interpreted) gives offline `generate`'s greedy tokens
    (xla attention) for more requests than slots, of different lengths."""
    config = qwenjax.ModelConfig.from_preset("tiny")
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (21, 4, 37, 9, 30)]
    model = qwenjax.build(config, dtype=jnp.float32, seed=4)
    expected = generate(model, prompts, 8)
    with auto_backend("pallas_gpu"):
        scheduler = Scheduler(
            model, slots=4, max_length=96, prefill_chunk=16, num_speculative_tokens=2
        )
        scheduler.start()
        try:
            params = SamplingParams(temperature=0.0, max_tokens=8)
            handles = [scheduler.submit(p, params) for p in prompts]
            for i, handle in enumerate(handles):
                tokens = [t for event in handle for t in event.token_ids]
                assert tokens == expected[i].tolist(), f"request {i}"
        finally:
            scheduler.stop()
