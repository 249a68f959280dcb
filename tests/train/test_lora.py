"""LoRA: adapters start at zero (the adapted model equals its base), every adapter applies to its
own projection (the adapted model equals its merged weights), and training moves only them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.api import add_lora, merge_lora
from qwenjax.config import FULL_ATTENTION
from qwenjax.train.optim import OptimConfig
from qwenjax.train.step import init_train_state, jit_train_step, make_train_step, microbatches
from tests.conftest import rel_err
from tests.train.packing import SMALL, packed_batch, random_model

logits = nnx.jit(lambda model, ids: model(ids))


def batch(seed: int, rows: int) -> dict[str, np.ndarray]:
    return packed_batch(seed=seed, rows=rows, seq_len=40, vocab=SMALL.vocab_size)


@pytest.fixture(scope="module")
def base():
    return random_model(SMALL, seed=5)


def test_adapted_model_starts_equal_to_its_base_and_equals_its_merged_weights(base):
    ids = batch(seed=5, rows=2)["input_ids"]
    adapted = add_lora(base, rank=4, alpha=8.0)
    np.testing.assert_array_equal(logits(adapted, ids), logits(base, ids))  # B starts at 0
    # Random B: each adapter's update must land on its own projection, in every layer.
    rng = np.random.default_rng(0)
    graphdef, lora, rest = nnx.split(adapted, nnx.LoRAParam, ...)
    lora = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.05, x.dtype), lora)
    adapted = nnx.merge(graphdef, lora, rest)
    merged = merge_lora(adapted)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    want = logits(merged, ids)
    assert rel_err(want, logits(base, ids)) > 1e-2  # the adapters matter
    assert rel_err(logits(adapted, ids), want) < 1e-5


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py)")
def test_training_moves_only_the_adapters():
    # Attention-only compiles twice as fast; the GDN adapters are covered by the test above.
    config = SMALL.replace(num_hidden_layers=2, layer_types=(FULL_ATTENTION,) * 2)
    model = add_lora(random_model(config, seed=6), rank=4, alpha=8.0)
    optim = OptimConfig(lr=1e-2, total_steps=10)
    mesh, rules = ax.make_mesh(ax.MeshConfig(fsdp=4, tensor=2)), ax.FSDP_TP_RULES
    state, shardings = init_train_state(model, optim, mesh, rules)
    trained = jax.tree.leaves(state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert trained and all(isinstance(v, nnx.LoRAParam) for v in trained)
    # The frozen base stays placed by the rules (no gathered copy) and in its own dtype.
    embed = state.frozen["embed_tokens"].get_value()
    embed_sharding = jax.NamedSharding(mesh, ax.spec((ax.VOCAB, ax.EMBED), rules))
    assert embed.sharding.is_equivalent_to(embed_sharding, 2)
    frozen_before = jax.tree.map(np.asarray, state.frozen)  # host copies: the step donates

    step = jit_train_step(make_train_step(model, optim, ce_chunk=16), mesh, rules, shardings)
    state, metrics = step(state, microbatches(batch(seed=6, rows=8), 1))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    frozen_after = jax.tree.leaves(state.frozen)
    for before, after in zip(jax.tree.leaves(frozen_before), frozen_after, strict=True):
        np.testing.assert_array_equal(np.asarray(after), before)
    b = state.params["blocks"]["layers"][0]["mixer"]["q_proj_lora"]["b"].get_value()
    assert np.abs(np.asarray(b)).max() > 0  # the adapters moved off their zero init
