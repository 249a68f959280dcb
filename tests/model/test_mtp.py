"""MTP head vs an independent float64 NumPy implementation of ARCHITECTURE.md §4.1."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from qwenjax.checkpoint import load
from tests.conftest import rel_err
from tests.oracles.mtp import mtp_logits


def test_mtp_head_matches_numpy_oracle(hf_checkpoint):
    hf, path = hf_checkpoint("text")
    model = load(path, dtype=jnp.float32)
    tensors = load_file(path / "mtp.safetensors")
    state = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    ids = np.random.default_rng(6).integers(0, model.config.vocab_size, (2, 41))
    hidden = model.hidden(jnp.asarray(ids))[:, :-1]  # h_i for i = 0..T-2
    ours = model.logits(model.mtp_hidden(hidden, jnp.asarray(ids[:, 1:])))
    for row in range(ids.shape[0]):
        expected = mtp_logits(
            np.asarray(hidden[row]),
            ids[row, 1:],
            tensors,
            state["model.embed_tokens.weight"],
            state["lm_head.weight"],
            model.config,
            positions=np.arange(ids.shape[1] - 1),
        )
        assert rel_err(ours[row], expected) < 1e-4


def test_model_without_mtp_says_so():
    import qwenjax

    model = qwenjax.build(qwenjax.ModelConfig.from_preset("tiny").replace(mtp_num_hidden_layers=0))
    with pytest.raises(ValueError, match="no MTP head"):
        model.mtp_hidden(jnp.zeros((1, 3, 96)), jnp.zeros((1, 3), jnp.int32))
