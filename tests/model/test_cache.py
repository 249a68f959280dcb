"""`write_rows` and `read_rows`: per-row slot writes and reads of caches and engine buffers."""

import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.config import ModelConfig
from qwenjax.model.cache import (
    SLOT_MULTIPLE,
    DeltaNetCache,
    KVCache,
    init_cache,
    read_rows,
    write_rows,
)


def _expected(buffer, update, start, slot_axis):
    out = np.moveaxis(buffer.copy(), slot_axis, 1)  # [B, S, ...], a view of the copy
    for b, s in enumerate(start):
        for t in range(update.shape[1]):
            if s + t < out.shape[1]:  # past the end: dropped
                out[b, s + t] = update[b, t]
    return np.moveaxis(out, 1, slot_axis)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("slot_axis", [1, 2])
def test_write_rows_writes_each_row_at_its_start_and_drops_slots_past_the_end(stacked, slot_axis):
    """Engine buffers `[B, S, ...]` and KV caches `[B, K, S, H]` (slot axis 2), alone and as
    layer 2 of a stack; updates `[B, T, ...]` are cast to the buffer's dtype."""
    rng = np.random.default_rng(slot_axis)
    rows, slots, t, feat = 3, 7, 3, (2, 5)
    shape = (rows, slots, *feat) if slot_axis == 1 else (rows, feat[0], slots, feat[1])
    buffer = rng.standard_normal((4, *shape)).astype(np.float32)
    update = rng.standard_normal((rows, t, *feat)).astype(np.float64)
    start = np.array([0, 2, 5])  # the last row's third slot is past S = 7
    args = jnp.asarray(update), jnp.asarray(start)
    if stacked:
        got = write_rows(jnp.asarray(buffer), *args, layer=2, slot_axis=slot_axis)
        want = buffer.copy()
        want[2] = _expected(buffer[2], update.astype(np.float32), start, slot_axis)
    else:
        got = write_rows(jnp.asarray(buffer[1]), *args, slot_axis=slot_axis)
        want = _expected(buffer[1], update.astype(np.float32), start, slot_axis)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)


def test_read_rows_reads_each_row_from_its_start():
    buffer = np.arange(3 * 9 * 2).reshape(3, 9, 2)
    start = np.array([4, 0, 6])
    got = np.asarray(read_rows(jnp.asarray(buffer), jnp.asarray(start), 3))
    want = np.stack([buffer[b, s : s + 3] for b, s in enumerate(start)])
    np.testing.assert_array_equal(got, want)


def test_kv_caches_put_heads_before_slots_and_round_the_slots_up():
    """`[NB, B, K, S, H]` stacks and the MTP layer's `[B, K, S, H]`, S = 37 rounded up to a
    multiple of `SLOT_MULTIPLE` (TPU's tiles); the other layers' states are as before."""
    config = ModelConfig.from_preset("tiny")
    cache = init_cache(config, 3, 37, jnp.float32, mtp=True)
    k, h, nb = config.num_key_value_heads, config.head_dim, config.num_blocks
    slots = -(-37 // SLOT_MULTIPLE) * SLOT_MULTIPLE
    assert slots > 37 and cache.max_length == slots
    kv = [layer for layer in cache.blocks if isinstance(layer, KVCache)]
    assert kv and all(c.k.shape == c.v.shape == (nb, 3, k, slots, h) for c in kv)
    assert cache.mtp.k.shape == (3, k, slots, h)
    gdn = [layer for layer in cache.blocks if isinstance(layer, DeltaNetCache)]
    n, e = config.linear_num_value_heads, config.linear_key_head_dim
    assert all(c.state.shape == (nb, 3, n, e, config.linear_value_head_dim) for c in gdn)
