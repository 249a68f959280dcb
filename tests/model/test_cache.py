"""`write_rows` and `read_rows`: per-row slot writes and reads of caches and engine buffers."""

import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.model.cache import read_rows, write_rows


def _expected(buffer: np.ndarray, update: np.ndarray, start: np.ndarray) -> np.ndarray:
    out = buffer.copy()
    for b, s in enumerate(start):
        for t in range(update.shape[1]):
            if s + t < buffer.shape[1]:  # past the end: dropped
                out[b, s + t] = update[b, t]
    return out


@pytest.mark.parametrize("stacked", [False, True])
def test_write_rows_writes_each_row_at_its_start_and_drops_slots_past_the_end(stacked):
    rng = np.random.default_rng(0)
    rows, slots, t, feat = 3, 7, 3, (2, 5)
    buffer = rng.standard_normal((4, rows, slots, *feat)).astype(np.float32)
    update = rng.standard_normal((rows, t, *feat)).astype(np.float64)  # cast to the buffer's
    start = np.array([0, 2, 5])  # the last row's third slot is past S = 7
    if stacked:
        got = write_rows(jnp.asarray(buffer), jnp.asarray(update), jnp.asarray(start), layer=2)
        want = buffer.copy()
        want[2] = _expected(buffer[2], update.astype(np.float32), start)
    else:
        got = write_rows(jnp.asarray(buffer[1]), jnp.asarray(update), jnp.asarray(start))
        want = _expected(buffer[1], update.astype(np.float32), start)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)


def test_read_rows_reads_each_row_from_its_start():
    buffer = np.arange(3 * 9 * 2).reshape(3, 9, 2)
    start = np.array([4, 0, 6])
    got = np.asarray(read_rows(jnp.asarray(buffer), jnp.asarray(start), 3))
    want = np.stack([buffer[b, s : s + 3] for b, s in enumerate(start)])
    np.testing.assert_array_equal(got, want)
