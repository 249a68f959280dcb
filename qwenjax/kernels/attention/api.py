"""The one attention entry point the model calls.

Backends:
  "xla"    the reference math (materialised [B, T, S] mask and logits), jitted by XLA; runs
           everywhere and handles every mask (decode over a cache, packed documents).
  "chunked" the same math over key blocks with an online softmax and FlashAttention's
           backward (`blockwise.py`): memory O(T * block) instead of O(T * S), also in the
           backward; fully masked key blocks skipped; any mask. Context parallelism's attention
           at long context runs on it.
  "cudnn"  cuDNN's fused flash attention through `jax.nn.dot_product_attention`, for self
           attention whose positions are in order (training and prefill from scratch): causal by
           index, packed documents as a segment mask. Measured on an H100 at head dim 256 and
           GQA 24:4 at 0.92-0.99x torch's SDPA (benchmarks/results/); the XLA path runs out of
           memory there at 32K tokens.
  "splash" JAX's splash attention (`splash.py`): Pallas Mosaic TPU flash kernels, forward and
           backward, for the same calls as "cudnn" (causal self attention, positions in order,
           packed documents as segment ids); T is padded to the block size. Interpreted off TPU.
  "pallas_gpu" JAX's Pallas Triton flash attention (`pallas_gpu.py`) for the same calls, segment
           ids compared in-kernel where cuDNN needs a dense mask; K/V repeated to the query
           heads. Opt-in until timed (compiles for an H100, tested); interpreted off GPU.
`cache_attention` is the twin for queries over a KV cache (decoding, speculative verification,
prefill chunks): "xla" or "chunked" as above, or "pallas_gpu" / "pallas_tpu", Pallas kernels
(Triton / Mosaic) that read only the keys each row can see (`decode_pallas_gpu.py`,
`decode_pallas_tpu.py`; opt-in until timed). "pallas_tpu" is a cache-attention backend only.
"auto" picks "cudnn" on GPU when the call allows it. Otherwise, when it allows "splash" and the
head dim is a multiple of 128 (the TPU lane width; the 27B model's is 256), "splash" when
lowered for TPU (`lax.platform_dependent`: chosen at lowering, so also when compiling ahead of
time for a TPU topology on a CPU host) and the fallback below on other platforms. The fallback is
"chunked" once T * S reaches `CHUNKED_MIN_ELEMENTS` (8192 x 8192: 256 MiB of fp32 logits per
head), else "xla". Decoding over a KV cache (queries at later positions than 0..T-1) never
allows the fused kernels. `auto_backend(name)` pins what "auto" means (a fused backend: for the
calls that allow it), for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from qwenjax.kernels.attention import decode_pallas_gpu, decode_pallas_tpu
from qwenjax.kernels.attention.blockwise import attention_blockwise
from qwenjax.kernels.attention.pallas_gpu import pallas_gpu_attention
from qwenjax.kernels.attention.reference import attention_mask, attention_reference
from qwenjax.kernels.attention.splash import BlockSizes, splash_attention
from qwenjax.kernels.pins import PinStack

BACKENDS = ("xla", "chunked", "cudnn", "splash", "pallas_gpu", "pallas_tpu")
FUSED = ("cudnn", "splash", "pallas_gpu")  # causal self attention at positions 0..T-1 only
CACHE_BACKENDS = ("xla", "chunked", "pallas_gpu", "pallas_tpu")  # what cache_attention runs
_CACHE_KERNELS = {"pallas_gpu": decode_pallas_gpu, "pallas_tpu": decode_pallas_tpu}
CHUNKED_MIN_ELEMENTS = 8192 * 8192  # the reference holds T * S logits per head
SPLASH_AUTO_HEAD_DIM = 128  # "auto" takes splash only for head dims that are multiples of this
_pins = PinStack()


@contextlib.contextmanager
def auto_backend(name: str) -> Iterator[None]:
    """Within the block (at trace time), backend="auto" means `name`: e.g. to run the model's
    attention layers on the interpreted splash kernel in tests, or to pin one in a benchmark."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    with _pins.pushed(name):
        yield


def _cudnn(q, k, v, q_segment_ids, kv_segment_ids, scale):
    mask = None
    if q_segment_ids is not None:
        mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]  # [B,1,T,S]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=True, implementation="cudnn"
    )


def _unfused(q, k, v, *, backend, q_positions, kv_positions, causal, scale, **segment_ids):
    """The pure-JAX paths: "chunked" (also for "auto" above the threshold) or "xla"."""
    positions = {"q_positions": q_positions, "kv_positions": kv_positions}
    if backend == "chunked" or (
        backend == "auto" and q.shape[1] * k.shape[1] >= CHUNKED_MIN_ELEMENTS
    ):
        return attention_blockwise(q, k, v, causal=causal, scale=scale, **positions, **segment_ids)
    mask = attention_mask(**segment_ids, **positions, causal=causal)
    return attention_reference(q, k, v, mask, scale)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    positions_in_order: bool = False,
    backend: str = "auto",
    splash_block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Grouped-query attention.

    Args:
      q: `[B, T, N, H]` queries; N must be a multiple of the kv heads K.
      k, v: `[B, S, K, H]` keys and values.
      q_positions, kv_positions: `[B, T]`, `[B, S]` token indices used for the causal rule.
      q_segment_ids, kv_segment_ids: `[B, T]`, `[B, S]` document ids; attention never crosses a
        document. Both or neither.
      causal: hide keys whose position is after the query's.
      scale: logit scale, default `H ** -0.5`.
      positions_in_order: the caller promises q_positions == kv_positions == arange(T) per row
        (self attention from scratch), so "causal" is causal by index; this lets "auto" use a
        fused kernel that takes no positions.
      backend: "auto" or one of `BACKENDS`.
      splash_block_sizes: tile sizes for "splash" (`splash.default_block_sizes(T)` if None).

    Returns:
      `[B, T, N, H]` in the dtype of `v`.

    Raises:
      ValueError: on an unknown backend, inconsistent shapes, or a call the fused backends
        (`FUSED`) cannot take.
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"attention expects q [B,T,N,H] and k = v [B,S,K,H] with N % K == 0; got "
            f"q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fused_ok = positions_in_order and causal and q.shape[1] == k.shape[1]
    pin = _pins.top()
    if backend == "auto" and ((fused_ok and pin in FUSED) or pin in ("xla", "chunked")):
        backend = pin  # a pinned fused backend where it can run, else plain "auto"
    if backend == "pallas_tpu":
        raise ValueError(
            "pallas_tpu attention runs over a KV cache (cache_attention); self attention on TPU "
            "runs splash"
        )
    if backend in FUSED and not fused_ok:
        raise ValueError(
            f"the {backend} backend needs causal self attention over keys at the queries' own "
            f"positions 0..T-1 (causal=True, positions_in_order=True, T == S); got "
            f"causal={causal}, positions_in_order={positions_in_order}, T={q.shape[1]}, "
            f"S={k.shape[1]}. Decoding over a KV cache uses the xla or chunked backend"
        )
    segment_ids = {"q_segment_ids": q_segment_ids, "kv_segment_ids": kv_segment_ids}
    splash = functools.partial(
        splash_attention, scale=scale, block_sizes=splash_block_sizes, **segment_ids
    )
    unfused = functools.partial(
        _unfused,
        backend=backend,
        q_positions=q_positions,
        kv_positions=kv_positions,
        causal=causal,
        scale=scale,
        **segment_ids,
    )
    if backend == "cudnn" or (backend == "auto" and fused_ok and jax.default_backend() == "gpu"):
        return _cudnn(q, k, v, q_segment_ids, kv_segment_ids, scale)
    if backend == "splash":
        return splash(q, k, v)
    if backend == "pallas_gpu":  # self attention: the queries' ids are the keys'
        return pallas_gpu_attention(q, k, v, scale=scale, segment_ids=q_segment_ids)
    if backend == "auto" and fused_ok and q.shape[-1] % SPLASH_AUTO_HEAD_DIM == 0:
        mosaic = functools.partial(splash, interpret=False)
        return jax.lax.platform_dependent(q, k, v, tpu=mosaic, default=unfused)
    return unfused(q, k, v)


def cache_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    layer: jax.Array | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> jax.Array:
    """Causal attention of `q [B, T, N, H]` at `q_positions [B, T]` over a KV cache `k, v
    [B, K, S, H]` whose slot s holds position s (slots after a query's position are unwritten
    or stale, and hidden). With `layer` (an int32 scalar), k and v are the stacked caches
    `[L, B, K, S, H]` of the model's scanned blocks and layer `layer` is read: the kernels
    index the stack themselves, since a slice handed to them would be a copy of the layer's
    whole cache every step.

    backend: "xla" or "chunked" (`attention`'s math), "pallas_gpu" / "pallas_tpu" (the decode
    kernels, for up to `MAX_ROWS` T x G query rows per kv head, the GPU one for power-of-two head
    dims; other calls take "auto"), or "auto": the xla or chunked path by size, unless
    `auto_backend` pins one of `CACHE_BACKENDS`. Returns `[B, T, N, H]` in v's dtype.
    """
    if backend not in ("auto", *CACHE_BACKENDS):
        raise ValueError(
            f"cache attention backend {backend!r}: choose from auto, {', '.join(CACHE_BACKENDS)}"
        )
    if backend == "auto" and _pins.top() in CACHE_BACKENDS:
        backend = _pins.top()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    stacked = layer is not None
    if k.ndim != 4 + stacked or v.shape != k.shape:
        want = "[L, B, K, S, H] stacks (layer given)" if stacked else "[B, K, S, H]"
        raise ValueError(f"cache attention: k and v must be {want}; got {k.shape}, {v.shape}")
    kernel = _CACHE_KERNELS.get(backend)
    if kernel is not None and kernel.supports(q.shape, k.shape[stacked:]):
        run = getattr(kernel, f"decode_attention_{backend}")
        if not stacked:
            k, v, layer = k[None], v[None], 0
        return run(q, k, v, jnp.asarray(layer, jnp.int32), q_positions=q_positions, scale=scale)
    if stacked:
        k, v = _read_layer(k, v, layer)
    # attention's order; XLA folds the transpose into its dots, which read [B, K, S, H] as is
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, S, K, H]
    kv_positions = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])
    return attention(
        q,
        k,
        v,
        q_positions=q_positions,
        kv_positions=kv_positions,
        scale=scale,
        backend="auto" if kernel is not None else backend,
    )


def _read_layer(k: jax.Array, v: jax.Array, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Layer `layer` of the stacked caches `[L, B, K, S, H]`. A TPU dot reads such a slice in
    place; a GPU one (jax 0.10) reads a copy, and XLA made the K and V copies one kernel, both
    alive at once (+256 MiB of temporaries at 32 rows x 4096 slots of the 27B): the barrier
    gives V's copy a kernel of its own, after K's, and K's is freed before it."""
    index = lambda c: jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False)

    def gpu(k, v):
        k = index(k)
        v, k = jax.lax.optimization_barrier((v, k))
        return k, index(v)

    return jax.lax.platform_dependent(k, v, cuda=gpu, default=lambda k, v: (index(k), index(v)))
