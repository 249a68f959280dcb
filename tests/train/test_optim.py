"""Optimizer: the learning-rate schedules, which parameters decay, and where clipping applies."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qwenjax
from qwenjax.train.optim import OptimConfig, decay_mask, learning_rate, make_optimizer


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_the_end_ratio(decay):
    config = OptimConfig(lr=2.0, warmup_steps=4, total_steps=24, end_lr_ratio=0.1, decay=decay)
    lr = np.asarray([learning_rate(config)(s) for s in range(30)])
    np.testing.assert_allclose(lr[:4], [0.5, 1.0, 1.5, 2.0])  # peak at the last warmup step
    assert np.all(np.diff(lr[4:]) <= 1e-7)  # then never rises
    end = 2.0 if decay == "constant" else 0.2
    np.testing.assert_allclose(lr[24:], end, rtol=1e-6)  # flat after total_steps
    middle = {"cosine": 0.2 + 1.8 * 0.5, "linear": 0.2 + 1.8 * 0.5, "constant": 2.0}[decay]
    assert lr[14] == pytest.approx(middle, rel=1e-6)  # halfway through the decay
    if decay == "cosine":  # slow at both ends, unlike linear
        assert lr[5] - lr[6] < 0.05 < lr[13] - lr[14]


def test_config_is_validated():
    with pytest.raises(ValueError, match="unknown decay"):
        OptimConfig(decay="exp")
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimConfig(warmup_steps=10, total_steps=5)


def test_weight_decay_spares_vectors_and_vocabulary_matrices():
    model = qwenjax.build(qwenjax.ModelConfig.from_preset("tiny"), abstract=True, lora_rank=2)
    mask = decay_mask(nnx.state(model))
    layer, attn = mask["blocks"]["layers"][0], mask["blocks"]["layers"][3]
    decayed = {
        "q_proj": attn["mixer"]["q_proj"],
        "in_proj_qkv": layer["mixer"]["in_proj_qkv"],
        "conv1d": layer["mixer"]["conv1d"],
        "down_proj": layer["mlp"]["down_proj"],
        "mtp.fc": mask["mtp"]["fc"],
        "lora.a": layer["mlp"]["up_proj_lora"]["a"],
        "lora.b": layer["mlp"]["up_proj_lora"]["b"],
    }
    spared = {
        "embed_tokens": mask["embed_tokens"],
        "lm_head": mask["lm_head"],
        "norm": mask["norm"]["weight"],
        "A_log": layer["mixer"]["A_log"],
        "dt_bias": layer["mixer"]["dt_bias"],
        "gated norm": layer["mixer"]["norm"]["weight"],
        "q_norm": attn["mixer"]["q_norm"]["weight"],
    }
    assert decayed == dict.fromkeys(decayed, True) and spared == dict.fromkeys(spared, False)


def _params():
    """A small State with a matrix, a stacked vector (norm-like) and an embedding."""
    rng = np.random.default_rng(0)
    p = lambda shape, names: nnx.Param(
        jnp.asarray(rng.normal(size=shape), jnp.float32), out_sharding=names, eager_sharding=False
    )
    return nnx.State(
        {
            "w": p((2, 3, 4), ("layers", "embed", "mlp")),
            "norm": p((2, 3), ("layers", "embed")),
            "embed": p((5, 3), ("vocab", "embed")),
        }
    )


def test_zero_gradients_only_decay_the_masked_parameters():
    params = _params()
    optimizer = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5, clip_norm=None))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
    want = -0.1 * 0.5 * params["w"].get_value()  # −lr · wd · w
    np.testing.assert_allclose(updates["w"].get_value(), want, rtol=1e-6)
    assert not np.any(updates["norm"].get_value()) and not np.any(updates["embed"].get_value())


def test_gradients_are_clipped_to_the_global_norm_before_adam():
    params = _params()
    config = OptimConfig(lr=0.1, weight_decay=0.0, clip_norm=1.0)
    clipped = make_optimizer(config)
    plain = make_optimizer(dataclasses.replace(config, clip_norm=None))
    state_c, state_p = clipped.init(params), plain.init(params)
    for scale in (10.0, 0.5):  # clipped, then below the threshold
        grads = optax.tree.scale(scale, params)
        scaled = optax.tree.scale(min(1.0, 1.0 / float(optax.tree.norm(grads))), grads)
        u_c, state_c = clipped.update(grads, state_c, params)
        u_p, state_p = plain.update(scaled, state_p, params)
        for a, b in zip(jax.tree.leaves(u_c), jax.tree.leaves(u_p), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5)
