"""The serving scheduler on a device mesh gives the tokens it gives on one device.

8 CPU devices as fsdp 4 x tensor 2 (Megatron heads split, FSDP weights): the model is placed by
`build_sharded`, the slots (a multiple of the batch split) are sharded over fsdp, and greedy
outputs of more requests than slots, with chunked prefill, equal offline `generate` on a single
device, with MTP speculation on (the plain step is the same model call without the drafter).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_serve_refuses_slots_the_mesh_cannot_split(tmp_path, capsys):
    """`qwenjax serve --mesh fsdp=8 --slots 4`: exit 2 with a clear error before any checkpoint
    is read (the path does not exist: that would be the error otherwise)."""
    from qwenjax.cli import main

    argv = ["serve", "--checkpoint", str(tmp_path / "unread"), "--mesh", "fsdp=8", "--slots", "4"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "--slots 4 must be a multiple of 8" in capsys.readouterr().err


def test_serve_refuses_a_gpu_attention_kernel_off_gpu(tmp_path, capsys):
    """`qwenjax serve --attention-kernel pallas_gpu` on this CPU: exit 2 naming the flag, before
    any checkpoint is read (there it would run in the Pallas interpreter)."""
    from qwenjax.cli import main

    argv = ["serve", "--checkpoint", str(tmp_path / "unread"), "--attention-kernel", "pallas_gpu"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--attention-kernel: kernels.attention=pallas_gpu is a GPU kernel" in err, err
