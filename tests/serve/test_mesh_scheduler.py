"""The serving scheduler on a device mesh gives the tokens it gives on one device.

8 CPU devices as fsdp 4 x tensor 2 (Megatron heads split, FSDP weights): the model is placed by
`build_sharded`, the slots (a multiple of the batch split) are sharded over fsdp, and greedy
outputs of more requests than slots, with chunked prefill, equal offline `generate` on a single
device, with MTP speculation on (the plain step is the same model call without the drafter).
"""

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax import sharding
from qwenjax.api import build, build_sharded
from qwenjax.config import ModelConfig
from qwenjax.inference.engine import generate
from qwenjax.inference.sampling import SamplingParams
from qwenjax.serve.scheduler import Scheduler


def test_mesh_scheduler_equals_single_device_generate():
    config = ModelConfig.from_preset("tiny")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (21, 4, 37, 9, 15, 30)]
    expected = generate(build(config, dtype=jnp.float32, seed=4), prompts, 8)
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
    rules = sharding.RULES["fsdp_tp"]
    model = build_sharded(config, mesh, rules, dtype=jnp.float32, seed=4)
    assert len(jax.tree.leaves(model)[0].sharding.device_set) == 8
    scheduler = Scheduler(
        model,
        slots=4,
        max_length=96,
        prefill_chunk=16,
        num_speculative_tokens=2,  # prefill, MTP drafts and verification all on the mesh
        mesh=mesh,
        rules=rules,
    )
    scheduler.start()
    try:
        handles = [
            scheduler.submit(p, SamplingParams(temperature=0.0, max_tokens=8)) for p in prompts
        ]
        for i, handle in enumerate(handles):
            tokens = [t for event in handle for t in event.token_ids]
            assert tokens == expected[i].tolist(), f"request {i}"
        assert scheduler.healthy
    finally:
        scheduler.stop()
