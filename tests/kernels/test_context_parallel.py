"""Context-parallel gated delta rule and attention on a 4-way sequence axis vs one device.

Each case runs the new functions under `jax.shard_map` with T split over `sequence` = 4 and
compares with the single-device reference on the whole sequence: outputs and final state to
1e-4 relative, gradients (of a random linear function of both) to 1e-3. Sizes are odd on
purpose: 75 tokens per shard (not a multiple of the 64-token chunk), Hv = 3 Hk, dk != dv.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qwenjax.kernels import context_parallel
from qwenjax.kernels.attention import attention, blockwise
from qwenjax.kernels.causal_conv import causal_conv1d
from qwenjax.kernels.context_parallel import (
    attention_context_parallel,
    causal_conv1d_context_parallel,
    gated_delta_rule_context_parallel,
)
from qwenjax.kernels.gated_delta_rule import gated_delta_rule
from tests.conftest import rel_err

SHARDS, SHARD_LEN = 4, 75
T = SHARDS * SHARD_LEN
B, HK, HV, DK, DV = 2, 1, 3, 16, 24
# Row 0: segment 1 spans shards 0-1 (starts at 40, inside shard 0), segment 2 starts exactly
# at the shard 1 | 2 boundary (150), segment 3 starts inside shard 2 and runs through shard 3.
# Row 1: one document over all shards except a reset inside shard 3 that reuses id 0.
SEGMENT_STARTS = (((40, 1), (150, 2), (170, 3)), ((260, 0),))
SEGMENT_STARTS_ROW1_FIRST = 5  # row 1 starts with id 5 so the reuse of id 0 is a change


def segment_ids() -> np.ndarray:
    ids = np.zeros((B, T), np.int32)
    ids[1] = SEGMENT_STARTS_ROW1_FIRST
    for row, starts in enumerate(SEGMENT_STARTS):
        for start, seg in starts:
            ids[row, start:] = seg
    return ids


def make_inputs(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "q": rng.standard_normal((B, T, HK, DK)).astype(np.float32),
        "k": rng.standard_normal((B, T, HK, DK)).astype(np.float32),
        "v": rng.standard_normal((B, T, HV, DV)).astype(np.float32),
        # Mostly slow decays, so the state visibly survives a whole 75-token shard.
        "g": -np.exp(rng.uniform(np.log(1e-3), np.log(0.3), (B, T, HV))).astype(np.float32),
        "beta": rng.uniform(0.05, 0.95, (B, T, HV)).astype(np.float32),
        "initial_state": rng.standard_normal((B, HV, DK, DV)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def mesh():
    # Auto axes, as `sharding.make_mesh` builds them: shard_map places the unsharded inputs.
    auto = (jax.sharding.AxisType.Auto,)
    return jax.sharding.Mesh(np.array(jax.devices()[:SHARDS]), ("sequence",), axis_types=auto)


def sharded_rule(mesh, backend):
    def local(q, k, v, g, beta, initial_state, seg):
        return gated_delta_rule_context_parallel(
            q,
            k,
            v,
            g,
            beta,
            axis_name="sequence",
            initial_state=initial_state,
            segment_ids=seg,
            backend=backend,
        )

    tokens = P(None, "sequence")
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tokens,) * 5 + (P(), tokens),
        out_specs=(tokens, P()),
        check_vma=False,  # as `sharding.shard_kernel` runs it
    )


def reference_rule(q, k, v, g, beta, initial_state, seg):
    return gated_delta_rule(
        q, k, v, g, beta, initial_state=initial_state, segment_ids=seg, backend="reference"
    )


def linear_loss(fn, cotangents):
    def loss(*args):
        out, state = fn(*args)
        return jnp.sum(out * cotangents[0]) + jnp.sum(state * cotangents[1])

    return loss


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_gated_delta_rule_context_parallel(mesh, backend):
    inputs = make_inputs(0)
    args = (*inputs.values(), jnp.asarray(segment_ids()))
    sharded = jax.jit(sharded_rule(mesh, backend))
    out, state = sharded(*args)
    want_out, want_state = jax.jit(reference_rule)(*args)
    assert rel_err(out, want_out) < 1e-4
    assert rel_err(state, want_state) < 1e-4

    rng = np.random.default_rng(1)
    cts = (rng.standard_normal(out.shape), rng.standard_normal(state.shape))
    argnums = tuple(range(6))  # q, k, v, g, beta, initial_state
    grads = jax.jit(jax.grad(linear_loss(sharded_rule(mesh, backend), cts), argnums))(*args)
    want = jax.jit(jax.grad(linear_loss(reference_rule, cts), argnums))(*args)
    for name, got, expected in zip(inputs, grads, want, strict=True):
        assert rel_err(got, expected) < 1e-3, name


def test_gated_delta_rule_context_parallel_defaults(mesh):
    """No segment ids and no initial state: the state still flows across all shards."""
    inputs = make_inputs(2)
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta")]
    tokens = P(None, "sequence")
    sharded = jax.shard_map(
        functools.partial(gated_delta_rule_context_parallel, axis_name="sequence"),
        mesh=mesh,
        in_specs=(tokens,) * 5,
        out_specs=(tokens, P()),
        check_vma=False,
    )
    out, state = jax.jit(sharded)(*args)
    want_out, want_state = gated_delta_rule(*args, backend="reference")
    assert rel_err(out, want_out) < 1e-4
    assert rel_err(state, want_state) < 1e-4


@pytest.mark.parametrize(
    ("backend", "causal"), [("auto", True), ("chunked", True), ("auto", False)]
)
def test_attention_context_parallel(mesh, backend, causal, monkeypatch):
    """ "chunked" in 128-key blocks (3, the last padded): early queries skip later blocks.
    Causal runs zig-zag, with the odd 75-token shards cut 38 + 37."""
    monkeypatch.setattr(blockwise, "LOGITS_PER_BLOCK", 1)
    rng = np.random.default_rng(3)
    n, kv, h = 6, 2, 16
    q = rng.standard_normal((B, T, n, h)).astype(np.float32)
    k = rng.standard_normal((B, T, kv, h)).astype(np.float32)
    v = rng.standard_normal((B, T, kv, h)).astype(np.float32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.asarray(segment_ids())

    def local(q, k, v, pos, seg):
        return attention_context_parallel(
            q,
            k,
            v,
            axis_name="sequence",
            q_positions=pos,
            kv_positions=pos,
            q_segment_ids=seg,
            kv_segment_ids=seg,
            causal=causal,
            backend=backend,
        )

    tokens = P(None, "sequence")
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(tokens,) * 5, out_specs=tokens, check_vma=False
    )

    def full(q, k, v, pos, seg):
        return attention(
            q,
            k,
            v,
            q_positions=pos,
            kv_positions=pos,
            q_segment_ids=seg,
            kv_segment_ids=seg,
            causal=causal,
        )

    assert rel_err(jax.jit(sharded)(q, k, v, pos, seg), full(q, k, v, pos, seg)) < 1e-4

    ct = rng.standard_normal(q.shape)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(sharded(*a) * ct), (0, 1, 2)))(q, k, v, pos, seg)
    want = jax.grad(lambda *a: jnp.sum(full(*a) * ct), (0, 1, 2))(q, k, v, pos, seg)
    for name, got, expected in zip("qkv", grads, want, strict=True):
        assert rel_err(got, expected) < 1e-3, name


@pytest.mark.parametrize(("shards", "shard_len"), [(4, 75), (8, 16), (2, 9)])
def test_attention_context_parallel_is_balanced(shards, shard_len, monkeypatch):
    """Which device attends for which query: an `attention` spy answers every query with the
    index of the device it ran on. Zig-zag, each device computes two half shards, d and
    2P - 1 - d, and the causal work (keys before each of its queries) is the same on every
    device up to the odd token; contiguous shards would give the last 2P - 1 times the first's."""
    t = shards * shard_len

    def spy(q, **kwargs):
        return jnp.full(q.shape, jax.lax.axis_index("sequence"), jnp.int32)

    monkeypatch.setattr(context_parallel, "attention", spy)
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:shards]), ("sequence",), axis_types=auto)
    pos = jnp.broadcast_to(jnp.arange(t), (1, t))
    x = jnp.zeros((1, t, 1, 1))

    def local(x, pos):
        return attention_context_parallel(
            x, x, x, axis_name="sequence", q_positions=pos, kv_positions=pos
        )

    tokens = P(None, "sequence")
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(tokens,) * 2, out_specs=tokens, check_vma=False
    )
    device = np.asarray(jax.jit(sharded)(x, pos))[0, :, 0, 0]  # [T] who computed each query

    half = (shard_len + 1) // 2
    starts = [j // 2 * shard_len + (j % 2) * half for j in range(2 * shards)]
    for j, start in enumerate(starts):  # half shard j, on device j or 2P - 1 - j
        end = starts[j + 1] if j + 1 < len(starts) else t
        assert (device[start:end] == min(j, 2 * shards - 1 - j)).all(), j
    work = np.bincount(device, weights=np.arange(1, t + 1), minlength=shards)
    assert work.max() / work.min() < 1 + 2 / shard_len, work


@pytest.mark.parametrize("with_segments", [True, False])
def test_causal_conv_context_parallel(mesh, with_segments):
    """Segments start inside shards, exactly on the shard 1 | 2 boundary, and one starts
    W - 2 tokens before a boundary; only W - 1 tokens per shard cross devices."""
    rng = np.random.default_rng(4)
    width, channels = 4, 10
    x = rng.standard_normal((B, T, channels)).astype(np.float32)
    w = rng.standard_normal((width, channels)).astype(np.float32)
    seg = segment_ids()
    seg[1, 2 * SHARD_LEN - (width - 2) :] += 7  # reads back across the boundary into it
    seg = jnp.asarray(seg) if with_segments else None
    tokens = P(None, "sequence")

    def local(x, w, *seg):
        return causal_conv1d_context_parallel(
            x, w, axis_name="sequence", segment_ids=seg[0] if seg else None
        )

    args = (x, w, *([seg] if with_segments else []))
    specs = (tokens, P(), *([tokens] if with_segments else []))
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=tokens))
    want = causal_conv1d(x, w, segment_ids=seg)[0]
    assert rel_err(sharded(*args), want) < 1e-6
    ct = rng.standard_normal(want.shape)
    grads = jax.grad(lambda x, w: jnp.sum(sharded(x, w, *args[2:]) * ct), (0, 1))(x, w)
    want_grads = jax.grad(
        lambda x, w: jnp.sum(causal_conv1d(x, w, segment_ids=seg)[0] * ct), (0, 1)
    )(x, w)
    for got, expected in zip(grads, want_grads, strict=True):
        assert rel_err(got, expected) < 1e-5
    hlo = sharded.lower(*args).compile().as_text()
    assert "all-to-all" not in hlo and "all-gather" not in hlo
    assert f"f32[{B},{width - 1},{channels}]{{2,1,0}} collective-permute" in hlo.replace("%", "")
