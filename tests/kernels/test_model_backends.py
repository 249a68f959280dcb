"""The whole model on each interpreted Pallas backend equals the pure-JAX path.

backend="auto" is pinned with `auto_backend`, so every GatedDeltaNet layer of the tiny model
(6 of 8, in one scan) runs the kernel under test, here in Pallas interpret mode on CPU. The
sequence is longer than the model's chunked threshold (64) and packs two documents. Compared:
logits (relative to their largest magnitude, <= 1e-4) and the gradient of a loss w.r.t. every
parameter (per tensor, <= 1e-3), against the same model with backend "chunked".
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwenjax
from qwenjax.kernels.gated_delta_rule import auto_backend
from tests.kernels.gdn_cases import rel_err


def _logits_and_grads(model, ids, seg, backend):
    graphdef, params = nnx.split(model)

    def loss(params):
        logits = nnx.merge(graphdef, params)(ids, segment_ids=seg)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)), logits

    with auto_backend(backend):  # traced inside the block: a fresh jit per backend
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_model_logits_and_gradients_match_pure_jax(backend: str):
    config = qwenjax.ModelConfig.from_preset("tiny")
    model = qwenjax.build(config, dtype=jnp.float32, seed=3)
    rng = np.random.default_rng(11)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (2, 97)), jnp.int32)
    seg = jnp.asarray(np.repeat([[0] * 40 + [1] * 57], 2, axis=0), jnp.int32)
    (_, logits), grads = _logits_and_grads(model, ids, seg, backend)
    (_, logits_ref), grads_ref = _logits_and_grads(model, ids, seg, "chunked")
    assert rel_err(logits, logits_ref) <= 1e-4, f"logits {rel_err(logits, logits_ref):.2e}"
    flat, flat_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    assert len(flat) == len(flat_ref) > 0
    worst = max(rel_err(g, r) for g, r in zip(flat, flat_ref, strict=True) if np.any(r))
    assert worst <= 1e-3, f"worst parameter gradient rel err {worst:.2e}"
