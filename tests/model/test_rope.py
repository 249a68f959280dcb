"""Rotary tables against transformers' Qwen3_5TextRotaryEmbedding: default, YaRN, 3-axis mRoPE."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

from qwenjax.config import ModelConfig, qwen3_6_27b, with_yarn
from qwenjax.model.rope import apply_rope, inv_frequencies, rope_tables
from tests.conftest import rel_err


def hf_rotary(config: ModelConfig):
    return Qwen3_5TextRotaryEmbedding(ModelConfig_to_hf_text(config))


def ModelConfig_to_hf_text(config: ModelConfig):
    import transformers

    return transformers.Qwen3_5TextConfig(
        **{k: v for k, v in config.to_hf().items() if k not in ("architectures", "model_type")}
    )


CONFIGS = {
    "27b": qwen3_6_27b(),
    "27b-yarn4": with_yarn(qwen3_6_27b(), 4.0),
    "27b-yarn2": with_yarn(qwen3_6_27b(), 2.0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tables_match_transformers(name):
    config = CONFIGS[name]
    rng = np.random.default_rng(0)
    # Three different position axes (image tokens) and large positions (long context).
    pos = rng.integers(0, 900_000, (3, 2, 37))
    cos, sin = rope_tables(config, jnp.asarray(pos), jnp.float32)
    ref_cos, ref_sin = hf_rotary(config)(torch.zeros(1, dtype=torch.float32), torch.tensor(pos))
    assert rel_err(cos, ref_cos.numpy()) < 1e-6
    assert rel_err(sin, ref_sin.numpy()) < 1e-6


def test_yarn_numbers_from_the_spec():
    """§1.3: indices 0..14 unchanged, 22..31 divided by 4, attention factor 0.1·ln 4 + 1."""
    base, _ = inv_frequencies(qwen3_6_27b())
    yarn, scale = inv_frequencies(with_yarn(qwen3_6_27b(), 4.0))
    np.testing.assert_allclose(yarn[:15], base[:15], rtol=1e-7)
    np.testing.assert_allclose(yarn[22:], base[22:] / 4, rtol=1e-6)
    assert np.all((yarn[15:22] < base[15:22]) & (yarn[15:22] > base[15:22] / 4))
    assert scale == pytest.approx(0.1 * np.log(4) + 1)


def test_apply_rope_rotates_only_the_rotary_dims():
    config = qwen3_6_27b()
    x = np.random.default_rng(1).standard_normal((1, 5, 2, 256)).astype(np.float32)
    pos = jnp.arange(5)[None]
    cos, sin = rope_tables(config, pos, jnp.float32)
    y = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    np.testing.assert_array_equal(y[..., 64:], x[..., 64:])
    # A rotation keeps the norm of each (j, j + 32) pair.
    pair = lambda a: a[..., :32] ** 2 + a[..., 32:64] ** 2
    np.testing.assert_allclose(pair(y), pair(x), rtol=1e-5)
