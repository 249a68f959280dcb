"""Attention backends vs a float64 NumPy oracle: the reference math and the blockwise one.

Odd sizes: T = S = 77 in key blocks of 16 (five blocks, the last padded), GQA 6:2, head dim 8;
packed documents (causal, as in the text model) and frames (non-causal, as in the ViT);
queries at later positions over a longer cache (decoding); a query whose document has no key
(zeros). Values within 1e-5 of the oracle, gradients of the blockwise path within 1e-4 of
autodiff of the reference.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.kernels.attention import attention
from qwenjax.kernels.attention.blockwise import attention_blockwise

B, N, K, H = 2, 6, 2, 8


def oracle(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, scale):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for n in range(q.shape[2]):
            kv = n // (q.shape[2] // k.shape[2])
            logits = q[b, :, n] @ k[b, :, kv].T * scale  # [T, S]
            visible = np.ones(logits.shape, bool)
            if causal:
                visible &= q_pos[b][:, None] >= kv_pos[b][None, :]
            if q_seg is not None:
                visible &= q_seg[b][:, None] == kv_seg[b][None, :]
            logits = np.where(visible, logits, -np.inf)
            top = np.max(logits, axis=1, keepdims=True)
            p = np.where(visible, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
            norm = p.sum(axis=1, keepdims=True)
            out[b, :, n] = np.where(norm > 0, p / np.where(norm > 0, norm, 1.0), 0.0) @ v[b, :, kv]
    return out


def case(name: str, seed: int):
    rng = np.random.default_rng(seed)
    t, s = (5, 50) if name == "decode" else (77, 77)
    x = {
        "q": rng.standard_normal((B, t, N, H)).astype(np.float32),
        "k": rng.standard_normal((B, s, K, H)).astype(np.float32),
        "v": rng.standard_normal((B, s, K, H)).astype(np.float32),
    }
    kv_pos = np.broadcast_to(np.arange(s), (B, s))
    q_pos = kv_pos[:, 40:45] if name == "decode" else kv_pos
    seg = np.zeros((B, s), np.int32)
    seg[0, 30:], seg[1, 16:], seg[1, 60:] = 1, 1, 2
    kw = {"q_positions": q_pos, "kv_positions": kv_pos, "causal": name != "frames"}
    if name in ("packed", "frames"):
        kw.update(q_segment_ids=seg, kv_segment_ids=seg)
    if name == "orphan":  # row 1's last queries belong to a document with no keys
        q_seg = seg.copy()
        q_seg[1, 70:] = 9
        kw.update(q_segment_ids=q_seg, kv_segment_ids=seg)
    return x, kw


CASES = ["packed", "frames", "decode", "orphan"]


@pytest.mark.parametrize("backend", ["xla", "chunked"])
@pytest.mark.parametrize("name", CASES)
def test_backends_match_float64_oracle(backend: str, name: str):
    x, kw = case(name, seed=CASES.index(name))
    run = functools.partial(attention, backend=backend, **kw)
    if backend == "chunked":  # small blocks, so several blocks and a padded last one
        unsegmented = {"q_segment_ids": None, "kv_segment_ids": None}
        run = functools.partial(attention_blockwise, block=16, scale=H**-0.5, **unsegmented)
        run = functools.partial(run, **kw)
    out = jax.jit(run)(**x)
    want = oracle(
        **x,
        q_pos=kw["q_positions"],
        kv_pos=kw["kv_positions"],
        q_seg=kw.get("q_segment_ids"),
        kv_seg=kw.get("kv_segment_ids"),
        causal=kw["causal"],
        scale=H**-0.5,
    )
    err = np.max(np.abs(np.asarray(out, np.float64) - want)) / np.max(np.abs(want))
    assert err <= 1e-5, f"{backend} {name}: {err:.2e}"
    if name == "orphan":
        assert not np.any(np.asarray(out)[1, 70:])


@pytest.mark.parametrize("name", CASES)
def test_blockwise_gradients_match_reference(name: str):
    """The custom VJP (recomputed probabilities from the log-sum-exp) vs autodiff of the
    reference; "decode" has a key block after every query (skipped), "orphan" rows see nothing."""
    x, kw = case(name, seed=7)
    cot = np.random.default_rng(8).standard_normal(x["q"].shape).astype(np.float32)
    blockwise = functools.partial(attention_blockwise, block=16, scale=H**-0.5, **kw)
    reference = functools.partial(attention, backend="xla", **kw)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q=q, k=k, v=v) * cot), (0, 1, 2)))(
            x["q"], x["k"], x["v"]
        )

    for got, want in zip(grads(blockwise), grads(reference), strict=True):
        err = np.max(np.abs(got - want)) / np.max(np.abs(want))
        assert err <= 1e-4, f"{name}: {err:.2e}"


def test_blockwise_backward_holds_no_per_block_carries():
    """The backward keeps O(T) residuals, also as the model runs it (remat'd layers in a scan):
    nothing of size (key blocks) x T, which is what autodiff through the key scan stored (the
    [T, N, H] accumulator per block) and what partial evaluation saved of the integer-only mask
    work per block (hundreds of GiB at 262K tokens under context parallelism)."""
    t = s = 256
    rng = np.random.default_rng(4)
    q = rng.standard_normal((B, t, N, H)).astype(np.float32)
    k, v = (rng.standard_normal((B, s, K, H)).astype(np.float32) for _ in range(2))
    pos = np.broadcast_to(np.arange(s), (B, s))
    run = functools.partial(
        attention_blockwise, q_positions=pos, kv_positions=pos, causal=True, scale=H**-0.5,
        block=16,
    )  # fmt: skip

    def layers(q, k, v):  # two remat'd layers in a scan, like the model's blocks
        @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
        def layer(x, _):
            return run(x, k, v).reshape(x.shape) + x, None

        return jax.lax.scan(layer, q, None, length=2)[0]

    for fn in (run, layers):
        loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v))
        text = str(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, v))
        shapes = re.findall(r"(?:f32|bool|i32)\[([0-9,]+)\]", text)
        biggest = max(math.prod(int(d) for d in dims.split(",")) for dims in shapes)
        # One block's logits [B, K, G, T, 16], or 2 layers' inputs: nothing per block x T.
        assert biggest <= max(B * N * t * 16, 2 * B * t * N * H), (fn, biggest)


def test_auto_uses_blockwise_for_long_sequences(monkeypatch):
    """Above the threshold "auto" never builds [T, S] arrays: traced, it holds no T x S value."""
    from qwenjax.kernels.attention import api

    monkeypatch.setattr(api, "CHUNKED_MIN_ELEMENTS", 77 * 77)
    x, kw = case("packed", seed=3)
    jaxpr = jax.make_jaxpr(functools.partial(attention, **kw))(**x)
    sizes = {v.aval.size for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "size")}
    assert max(sizes) < 77 * 77 * N, max(sizes)
    np.testing.assert_allclose(
        attention(**x, **kw), attention(**x, **kw, backend="xla"), rtol=1e-5, atol=1e-6
    )
