"""The 64 layers compile as one scan over 16 super-blocks, not 64 unrolled layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import qwenjax


def top_level_scans(config):
    model = qwenjax.build(config, abstract=True, dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s).hidden(x))(state, ids)
    return [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"], jaxpr


def test_27b_trunk_is_a_single_scan_over_16_blocks():
    scans, jaxpr = top_level_scans(qwenjax.ModelConfig.from_preset("qwen3.6-27b"))
    assert [eqn.params["length"] for eqn in scans] == [16]
    # Trace size does not grow with depth: 16 blocks trace to the same program as 2.
    _, tiny = top_level_scans(
        qwenjax.ModelConfig.from_preset("qwen3.6-27b").replace(
            num_hidden_layers=8, layer_types=qwenjax.ModelConfig.from_preset("tiny").layer_types
        )
    )
    assert len(jaxpr.eqns) == len(tiny.eqns)
