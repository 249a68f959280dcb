"""Training checkpoints of an earlier parameter layout resume: until 2026-11-27 the q/k/v and
Gated DeltaNet z projections were `[D, N, H]` (their optimizer moments too), now `[D, N·H]`. A
checkpoint of the old layout restores on a 4-device mesh (fsdp 2 x tensor 2) into today's
shapes and shardings with every value equal; a leaf of another shape is refused by name."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from qwenjax import sharding as ax
from qwenjax.train.checkpoints import CheckpointConfig, Checkpointer, abstract_like
from qwenjax.train.optim import OptimConfig
from qwenjax.train.step import init_train_state
from tests.train.packing import SMALL, random_model

OPTIM = OptimConfig(lr=1e-3, warmup_steps=1, total_steps=10)


@pytest.fixture(scope="module")
def state():
    mesh = ax.make_mesh(ax.MeshConfig(fsdp=2, tensor=2), devices=jax.devices()[:4])
    state, _ = init_train_state(random_model(SMALL, seed=3), OPTIM, mesh, ax.FSDP_TP_RULES)
    # Distinct values everywhere (the optimizer moments start at zero), so a misplaced
    # element shows.
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(0)
    noisy = [
        jax.device_put(rng.standard_normal(x.shape).astype(x.dtype), x.sharding)
        if x.size > 1
        else x
        for x in leaves
    ]
    return jax.tree.unflatten(tree, noisy)


HEADS = {  # projection: heads its last dim holds, as stored before 2026-11-27
    "q_proj": SMALL.num_attention_heads,
    "k_proj": SMALL.num_key_value_heads,
    "v_proj": SMALL.num_key_value_heads,
    "in_proj_z": SMALL.linear_num_value_heads,
}


def old_layout(state):
    """The state as the earlier code held it: projections `[..., N, H]`."""
    split = []

    def old(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        heads = next((HEADS[n] for n in names if n in HEADS), None)
        if heads is None:
            return x
        split.append(jax.tree_util.keystr(path))
        return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)

    return jax.tree_util.tree_map_with_path(old, state), split


def test_old_layout_checkpoint_resumes_reshaped(state, tmp_path):
    old, split = old_layout(state)
    # params, mu and nu of the blocks' q, k, v, z projections and the MTP layer's q, k, v
    assert len(split) == 3 * 7 and any("in_proj_z" in p for p in split), split
    saver = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    saver.save(7, old, {"position": 11})
    saver.close()

    restored, data, step = Checkpointer(tmp_path, CheckpointConfig()).restore(abstract_like(state))
    assert (step, data) == (7, {"position": 11})
    key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    values = lambda x: np.asarray(jax.random.key_data(x) if key(x) else x)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert got.shape == want.shape and got.sharding == want.sharding
        np.testing.assert_array_equal(values(got), values(want))


def test_a_leaf_of_another_shape_is_refused_by_name(state, tmp_path):
    old, _ = old_layout(state)
    embed = old.params["embed_tokens"]
    old.params["embed_tokens"] = embed.replace(embed[...][:, :-1])
    saver = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    saver.save(3, old, {})
    saver.close()
    with pytest.raises(ValueError, match=r"step 3 .*\['embed_tokens'\].* is \(\d+, 95\)"):
        Checkpointer(tmp_path, CheckpointConfig()).restore(abstract_like(state))
