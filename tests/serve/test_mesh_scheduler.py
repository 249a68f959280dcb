"""The serving scheduler on a device mesh gives the tokens it gives on one device.

8 CPU devices as fsdp 4 x tensor 2 (Megatron heads split, FSDP weights): the model is placed by
`build_sharded`, the slots (a multiple of the batch split) are sharded over fsdp, and greedy
outputs of more requests than slots, with chunked prefill, equal offline `generate` on a single
device, with MTP speculation on (the plain step is the same model call without the drafter).
"""

import jax
import pytest

from qwenjax.serve.scheduler import Scheduler
from tests.scheduler_cases import SCHEDULER, assert_scheduler_gives, mesh_model, tiny_requests


def test_mesh_scheduler_equals_single_device_generate():
    config, prompts, expected = tiny_requests(5)
    model, mesh = mesh_model(config)
    assert len(jax.tree.leaves(model)[0].sharding.device_set) == 8
    # prefill, MTP drafts and verification all on the mesh
    assert_scheduler_gives(Scheduler(model, **SCHEDULER, **mesh), prompts, expected)


def test_serve_refuses_slots_the_mesh_cannot_split(tmp_path, capsys):
    """`qwenjax serve --mesh fsdp=8 --slots 4`: exit 2 with a clear error before any checkpoint
    is read (the path does not exist: that would be the error otherwise)."""
    from qwenjax.cli import main

    argv = ["serve", "--checkpoint", str(tmp_path / "unread"), "--mesh", "fsdp=8", "--slots", "4"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "--slots 4 must be a multiple of 8" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "name", "key"),
    [
        ("--attention-kernel", "pallas_gpu", "attention"),
        ("--gdn-kernel", "pallas_gpu", "gated_delta_rule"),
    ],
)
def test_serve_refuses_a_gpu_kernel_off_gpu(tmp_path, capsys, flag, name, key):
    """`qwenjax serve --attention-kernel pallas_gpu` (or `--gdn-kernel`) on this CPU: exit 2
    naming the flag, before any checkpoint is read (there it would run in the Pallas
    interpreter)."""
    from qwenjax.cli import main

    argv = ["serve", "--checkpoint", str(tmp_path / "unread"), flag, name]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag}: kernels.{key}={name} is a GPU kernel" in err, err
