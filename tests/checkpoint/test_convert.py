"""HF → qwenjax → HF round trips, `load` from both formats, and parity with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from qwenjax.checkpoint import hf_to_qwenjax, load, qwenjax_to_hf
from qwenjax.checkpoint.convert import convert
from tests.checkpoint.conftest import DTYPES, LAYOUTS, SIDE_FILES, read_all
from tests.conftest import rel_err


def params(model) -> dict:
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for path in a:
        x, y = np.asarray(a[path]), np.asarray(b[path])
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_is_bit_exact(hf_source, tmp_path, layout, dtype):
    _, src = hf_source(layout, dtype)
    ours = convert(src, tmp_path / "ours", progress=False)
    back = convert(ours, tmp_path / "back", max_shard_size="40KB", progress=False)

    original, exported = read_all(src), read_all(back)
    visual = {k for k in original if k.startswith("model.visual.")}
    assert (layout == "vlm") == bool(visual)
    assert any(k.startswith("mtp.") for k in original)
    assert exported.keys() == original.keys()  # the vision tower included
    for key in original:
        assert exported[key] == original[key], key  # dtype, shape and bytes
    for name in ["config.json", "generation_config.json", *SIDE_FILES]:
        assert (back / name).read_bytes() == (src / name).read_bytes(), name
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(len(v[2]) for v in exported.values())


def test_export_loads_in_transformers(hf_source, converted, tmp_path):
    model, _ = hf_source("text", "float32")
    back = qwenjax_to_hf(converted("text", "float32"), tmp_path / "back", progress=False)
    reloaded = transformers.Qwen3_5ForCausalLM.from_pretrained(back)
    expected, got = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_hf_equals_load_converted(hf_source, converted, layout, dtype):
    from_hf = params(load(hf_source(layout, dtype)[1]))
    assert_same_params(from_hf, params(load(converted(layout, dtype))))
    # dtype=None keeps the checkpoint's dtypes.
    assert from_hf[("embed_tokens",)].dtype == jnp.dtype(dtype)
    assert from_hf[("mtp", "fc")].dtype == jnp.dtype(dtype)


def _as_version_1(src: Path, dst: Path) -> Path:
    """A copy of our checkpoint `src` as version 1 wrote it: q/k/v and GDN z split `[.., N, H]`."""
    from qwenjax.checkpoint import orbax_io
    from qwenjax.config import ModelConfig

    cfg = ModelConfig.from_hf(src)
    heads = {
        "q_proj": cfg.num_attention_heads,
        "k_proj": cfg.num_key_value_heads,
        "v_proj": cfg.num_key_value_heads,
        "in_proj_z": cfg.linear_num_value_heads,
    }
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((src / "qwenjax.json").read_text())
    assert manifest["version"] == 2
    (dst / "qwenjax.json").write_text(json.dumps({**manifest, "version": 1}))
    info = orbax_io.leaf_info(src)
    writer, split = orbax_io.ParamWriter(dst), 0
    for path, leaf in orbax_io.iter_leaves(src, list(info)):
        if path[-1] in heads:
            leaf, split = leaf.reshape(*leaf.shape[:-1], heads[path[-1]], -1), split + 1
        writer.add(path, leaf)
    writer.close()
    assert split == 3 + 3 + 3  # the 3 GDN layers' z, q/k/v of the attention layer and of MTP
    return dst


def test_version_1_checkpoint_loads_and_exports(hf_source, converted, tmp_path):
    _, hf = hf_source("text", "float32")
    v1 = _as_version_1(converted("text", "float32"), tmp_path / "v1")
    assert_same_params(params(load(v1)), params(load(hf)))
    back = qwenjax_to_hf(v1, tmp_path / "back", progress=False)
    assert read_all(back) == read_all(hf)


def test_relative_paths_write_and_load(hf_source, tmp_path, monkeypatch):
    """Conversion to and loading from a path relative to the working directory (the README's
    `qwenjax demo --run-dir runs/demo`): orbax takes only absolute paths, and its metadata read
    used to return an empty tree for a relative one, so every parameter was "not found"."""
    _, src = hf_source("text", "float32")
    monkeypatch.chdir(tmp_path)
    ours = convert(src, Path("runs") / "ours", progress=False)
    assert not Path(ours).is_absolute()
    assert_same_params(params(load(src)), params(load(Path("runs") / "ours")))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_transformers(hf_source, layout):
    model, path = hf_source(layout, "float32")
    ids = np.random.default_rng(0).integers(0, model.config.get_text_config().vocab_size, (2, 13))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(load(path)(jnp.asarray(ids)))
    assert rel_err(got, expected) < 1e-4


def test_dtype_casts_every_parameter(hf_source, tmp_path):
    _, src = hf_source("text", "float32")
    ours = hf_to_qwenjax(src, tmp_path / "ours", dtype="bfloat16", progress=False)
    assert json.loads((ours / "qwenjax.json").read_text())["dtype"] == "bfloat16"
    back = qwenjax_to_hf(ours, tmp_path / "back", progress=False)
    original, exported = read_all(src), read_all(back)
    for key, (_, shape, raw) in original.items():
        rounded = np.frombuffer(raw, np.float32).astype(ml_dtypes.bfloat16)  # round to nearest
        assert exported[key] == ("bfloat16", shape, rounded.tobytes()), key
    loaded = params(load(src, dtype=jnp.bfloat16))
    assert_same_params(loaded, params(load(ours)))
    assert load(ours).dtype == jnp.bfloat16  # compute dtype follows the parameters


def test_progress_reports_every_tensor(hf_source, tmp_path, capsys):
    _, src = hf_source("text", "float32")
    capsys.readouterr()
    hf_to_qwenjax(src, tmp_path / "ours", progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    n = sum(1 for k in read_all(src))
    assert len(lines) == n + 1
    assert lines[0].startswith(f"import [  1/{n}]") and "MB" in lines[0]
    assert lines[-1].startswith(f"import: {n} tensors")


def test_load_places_parameters_on_one_device(converted):
    model = load(converted("text", "float32"))
    devices = {d for v in params(model).values() for d in v.devices()}
    assert devices == {jax.local_devices()[0]}


@pytest.mark.parametrize("source", ["hf", "qwenjax"])
def test_sharded_load_places_every_parameter_by_the_rules(hf_source, converted, source):
    from qwenjax import sharding

    _, src = hf_source("text", "float32")
    path = src if source == "hf" else converted("text", "float32")
    # The test model's odd sizes (vocab 331, 3 heads) leave only the width to split.
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    rules = sharding.RULES["fsdp"]
    model = load(path, mesh=mesh, rules=rules)
    expected = {
        p: v.get_value() for p, v in nnx.to_flat_state(sharding.param_shardings(model, mesh, rules))
    }
    single = params(load(path))
    got = params(model)
    assert got.keys() == single.keys() == expected.keys()
    split = 0
    for path_, value in got.items():
        assert value.sharding == expected[path_], path_
        split += value.sharding.shard_shape(value.shape) != value.shape
        np.testing.assert_array_equal(np.asarray(value), np.asarray(single[path_]))
    assert split > len(got) // 2  # the mesh really splits most parameters


def test_sharded_load_rejects_a_mesh_that_does_not_divide(hf_source):
    from qwenjax import sharding

    _, src = hf_source("text", "float32")
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1, tensor=8))
    with pytest.raises(ValueError, match=r"vocab=331 not divisible by tensor=8"):
        load(src, mesh=mesh, rules=sharding.RULES["fsdp_tp"])
