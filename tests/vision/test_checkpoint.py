"""The vision tower in checkpoints: HF ⇄ qwenjax bit-exact, `load(vision=True)` from both, and
a text-only load that never reads a `model.visual.*` byte."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from qwenjax import sharding
from qwenjax.checkpoint import CheckpointError, convert, load, orbax_io
from qwenjax.checkpoint.convert import hf_to_qwenjax, qwenjax_to_hf
from qwenjax.vision.model import Qwen35VL
from tests.checkpoint.conftest import read_all


def params(model) -> dict:
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def converted(hf_vlm, tmp_path_factory):
    return hf_to_qwenjax(hf_vlm[1], tmp_path_factory.mktemp("ours") / "ckpt", progress=False)


def test_round_trip_keeps_the_vision_tower_bit_exact(hf_vlm, converted, tmp_path):
    hf, src = hf_vlm
    manifest = json.loads((converted / "qwenjax.json").read_text())
    assert manifest["vision"] is True
    back = qwenjax_to_hf(converted, tmp_path / "back", max_shard_size="30KB", progress=False)
    original, exported = read_all(src), read_all(back)
    assert sum(k.startswith("model.visual.") for k in original) == 3 + 3 * 12 + 6
    assert exported.keys() == original.keys()
    for key in original:
        assert exported[key] == original[key], key
    reloaded = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(back)
    for key, value in hf.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


def test_load_with_vision_from_either_format(hf_vlm, converted):
    from_hf, from_ours = load(hf_vlm[1], vision=True), load(converted, vision=True)
    assert isinstance(from_hf, Qwen35VL) and isinstance(from_ours, Qwen35VL)
    a, b = params(from_hf), params(from_ours)
    assert a.keys() == b.keys()
    assert sum(p[0] == "visual" for p in a) == 3 + 12 + 6
    for path in a:
        assert np.asarray(a[path]).tobytes() == np.asarray(b[path]).tobytes(), path
    # the patch embedding is HF's Conv3d weight [D, C, Tp, P, P] as a [C, Tp, P, P, D] kernel
    conv = hf_vlm[0].model.visual.patch_embed.proj.weight.detach().numpy()
    np.testing.assert_array_equal(a[("visual", "patch_embed", "kernel")], np.moveaxis(conv, 0, -1))


def test_text_only_load_reads_no_vision_tensor(hf_vlm, converted, monkeypatch):
    import qwenjax.checkpoint.convert as convert_module

    read, read_tensor = [], convert_module.read_tensor
    record = lambda info: read.append(info.key) or read_tensor(info)
    monkeypatch.setattr(convert_module, "read_tensor", record)
    text = load(hf_vlm[1])
    assert read and not any(k.startswith("model.visual.") for k in read)
    assert not hasattr(text, "visual")

    requested, iter_leaves = [], orbax_io.iter_leaves
    record = lambda d, paths, *a: requested.extend(paths) or iter_leaves(d, paths, *a)
    monkeypatch.setattr(orbax_io, "iter_leaves", record)
    text = load(converted)
    assert requested and not any(p[0] == "visual" for p in requested)
    assert not hasattr(text, "visual")


def test_vision_load_errors_are_clear(hf_vlm, hf_checkpoint, tmp_path):
    _, text_path = hf_checkpoint("text")
    with pytest.raises(CheckpointError, match="no vision_config"):
        load(text_path, vision=True)
    # A VLM checkpoint missing one vision tensor: the text model loads, the VLM names it.
    stripped = tmp_path / "stripped"
    shutil.copytree(hf_vlm[1], stripped)
    gone = "model.visual.merger.norm.bias"
    index_path = stripped / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = stripped / index["weight_map"].pop(gone)
    tensors = safetensors.numpy.load_file(shard)
    del tensors[gone]
    safetensors.numpy.save_file(tensors, shard)
    index_path.write_text(json.dumps(index))
    load(stripped)
    with pytest.raises(CheckpointError, match=f"missing +{gone}"):
        load(stripped, vision=True)


def test_convert_dispatches_on_the_source(converted, tmp_path):
    back = convert.convert(converted, tmp_path / "back", progress=False)
    assert any(k.startswith("model.visual.") for k in read_all(back))


def test_sharded_vision_load_and_tower(hf_vlm):
    """Every ViT parameter carries logical names; a mesh splits them and the tower's output is
    the single-device one."""
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    rules = sharding.RULES["fsdp"]
    model = load(hf_vlm[1], vision=True, mesh=mesh, rules=rules)
    visual = nnx.to_flat_state(nnx.state(model.visual, nnx.Param))
    split = 0
    for path, v in visual:
        assert len(v.get_metadata()["out_sharding"]) == v.ndim, path
        value = v.get_value()
        split += value.sharding.shard_shape(value.shape) != value.shape
    assert split > len(visual) // 2

    grid = np.array([[1, 4, 6], [2, 2, 2]])
    pixel_values = np.random.default_rng(0).standard_normal((32, 1536)).astype(np.float32)
    graphdef, state = nnx.split(model.visual)

    @jax.jit
    def tower(state, pixel_values, grid):
        with sharding.use_rules(mesh, rules):
            return nnx.merge(graphdef, state)(pixel_values, grid)

    single = load(hf_vlm[1], vision=True).visual(jnp.asarray(pixel_values), grid)
    np.testing.assert_allclose(tower(state, pixel_values, grid), single, rtol=1e-5, atol=1e-6)
