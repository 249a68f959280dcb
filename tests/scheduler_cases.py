"""Shared by the scheduler tests: the tiny model's requests, the mesh, and the check that a
scheduler gives offline `generate`'s greedy tokens."""

import jax.numpy as jnp
import numpy as np

import qwenjax
from qwenjax import sharding
from qwenjax.api import build_sharded
from qwenjax.inference.engine import generate
from qwenjax.inference.sampling import SamplingParams
from qwenjax.serve.scheduler import Scheduler

LENGTHS = (21, 4, 37, 9, 15, 30)  # more requests than 4 slots, some over a 16-token chunk
SCHEDULER = {"slots": 4, "max_length": 96, "prefill_chunk": 16, "num_speculative_tokens": 2}


def tiny_requests(seed: int, model_seed: int = 4, lengths=LENGTHS):
    """The tiny config, random prompts and single-device greedy `generate` of 8 tokens each."""
    config = qwenjax.ModelConfig.from_preset("tiny")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in lengths]
    expected = generate(qwenjax.build(config, dtype=jnp.float32, seed=model_seed), prompts, 8)
    return config, prompts, expected


def mesh_model(config, seed: int = 4):
    """The tiny model on 8 CPU devices as fsdp 4 x tensor 2 (Megatron heads, FSDP weights)."""
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
    rules = sharding.RULES["fsdp_tp"]
    model = build_sharded(config, mesh, rules, dtype=jnp.float32, seed=seed)
    return model, {"mesh": mesh, "rules": rules}


def assert_scheduler_gives(scheduler: Scheduler, prompts, expected) -> None:
    """Starts `scheduler`, submits every prompt at once (greedy, 8 tokens) and checks each
    request's streamed tokens against `expected`; stops it whatever happens."""
    scheduler.start()
    try:
        params = SamplingParams(temperature=0.0, max_tokens=8)
        handles = [scheduler.submit(p, params) for p in prompts]
        for i, handle in enumerate(handles):
            tokens = [t for event in handle for t in event.token_ids]
            assert tokens == expected[i].tolist(), f"request {i}"
        assert scheduler.healthy
    finally:
        scheduler.stop()
