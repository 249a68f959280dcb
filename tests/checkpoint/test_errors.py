"""Every way a checkpoint can be wrong gives one clear error, and failed writes leave nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from qwenjax.checkpoint import CheckpointError, hf_to_qwenjax, load, qwenjax_to_hf
from qwenjax.checkpoint import orbax_io as orbax_io_module
from qwenjax.checkpoint.convert import convert
from qwenjax.checkpoint.hf_io import ShardedWriter, write_safetensors
from qwenjax.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
UP = "model.layers.1.mlp.up_proj.weight"  # [112, 80] in the test model
EXTRA = "model.layers.0.mlp.extra_proj.weight"


@pytest.fixture
def tensors(hf_source):
    """The tiny text checkpoint's tensors, in memory, to be damaged and rewritten."""
    _, src = hf_source("text", "float32")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(src / name, framework="numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def write_hf(path: Path, tensors: dict, config_from: Path) -> Path:
    path.mkdir()
    shutil.copy(config_from / "config.json", path / "config.json")
    write_safetensors(path, tensors, max_shard_size="100KB")
    return path


def drop(t):
    del t[UP]


def add(t):
    t[EXTRA] = np.zeros((3, 4), np.float32)


def reshape(t):
    t["model.norm.weight"] = np.zeros(81, np.float32)


def mix(t):
    t[UP] = t[UP].astype(ml_dtypes.bfloat16)


MISSING = ["missing", UP, "expected [112, 80], not found"]
UNEXPECTED = ["unexpected", EXTRA, "found [3, 4]"]
MISSHAPED = ["mis-shaped", "model.norm.weight", "expected [80], found [81]"]
MIXED = ["mixed dtypes", "model.layers.5.mlp.up_proj.weight: float32", f"{UP}: bfloat16"]


@pytest.mark.parametrize("op", ["convert", "load"])
@pytest.mark.parametrize(
    "damage, expected",
    [
        ([drop], MISSING),
        ([add], UNEXPECTED),
        ([reshape], MISSHAPED),
        ([mix], MIXED),
        ([drop, add, reshape], MISSING + UNEXPECTED + MISSHAPED + ["3 problem(s)"]),
    ],
    ids=["missing", "unexpected", "mis-shaped", "mixed-dtype", "all-in-one-error"],
)
def test_mismatched_tensors_are_reported_together(
    hf_source, tensors, tmp_path, op, damage, expected
):
    for fn in damage:
        fn(tensors)
    src = write_hf(tmp_path / "hf", tensors, hf_source("text", "float32")[1])
    with pytest.raises(CheckpointError) as e:
        hf_to_qwenjax(src, tmp_path / "out", progress=False) if op == "convert" else load(src)
    for text in expected:
        assert text in str(e.value)
    assert not (tmp_path / "out").exists()


def truncate_data(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[:-10])


def garble_header(shard: Path) -> None:
    raw = bytearray(shard.read_bytes())
    raw[8:20] = b"#" * 12
    shard.write_bytes(bytes(raw))


def truncate_header(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[:20])


def delete(shard: Path) -> None:
    shard.unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (truncate_data, "truncated"),
        (garble_header, "corrupt safetensors header"),
        (truncate_header, "corrupt or truncated header"),
        (delete, "does not exist"),
    ],
)
def test_corrupt_shard_names_the_file(hf_source, tmp_path, damage, message):
    src = tmp_path / "hf"
    shutil.copytree(hf_source("text", "float32")[1], src)
    shard = src / "model-00003-of-00048.safetensors"
    damage(shard)
    with pytest.raises(CheckpointError, match=message) as e:
        hf_to_qwenjax(src, tmp_path / "out", progress=False)
    assert shard.name in str(e.value)


def test_unknown_config_key_is_a_config_error(hf_source, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(hf_source("text", "float32")[1], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "bogus_option": 1}))
    with pytest.raises(ConfigError, match="bogus_option"):
        hf_to_qwenjax(src, tmp_path / "out", progress=False)


@pytest.mark.parametrize("direction", ["import", "export"])
def test_existing_destination(hf_source, converted, tmp_path, direction):
    src = hf_source("text", "float32")[1] if direction == "import" else converted()
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert(src, dst, progress=False)
    convert(src, dst, overwrite=True, progress=False)
    assert not (dst / "old").exists()
    load(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no temp or old dirs left


def test_source_and_destination_must_differ(converted):
    with pytest.raises(ValueError, match="must not contain each other"):
        convert(converted(), converted() / "inner", progress=False)


def test_params_without_manifest_is_rejected(converted, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted(), ckpt)
    (ckpt / orbax_io_module.MANIFEST).unlink()
    for fn in (load, lambda p: qwenjax_to_hf(p, tmp_path / "out", progress=False)):
        with pytest.raises(CheckpointError, match="incomplete qwenjax checkpoint"):
            fn(ckpt)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load(tmp_path)


@pytest.mark.parametrize("direction", ["import", "export"])
def test_failed_write_leaves_no_destination(hf_source, converted, tmp_path, monkeypatch, direction):
    """An exception mid-write removes the temporary directory; the destination never appears."""
    cls, method = (
        (orbax_io_module.ParamWriter, "add") if direction == "import" else (ShardedWriter, "write")
    )
    original, calls = getattr(cls, method), []

    def failing(self, *args):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("simulated crash")
        original(self, *args)

    monkeypatch.setattr(cls, method, failing)
    src = hf_source("text", "float32")[1] if direction == "import" else converted()
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(src, tmp_path / "dst", progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "dst")


@pytest.mark.parametrize("direction", ["import", "export"])
def test_killed_write_leaves_only_a_detectable_temp_dir(hf_source, converted, tmp_path, direction):
    """SIGKILL mid-write: no destination, and `load` of the leftover temp dir fails clearly."""
    src = hf_source("text", "float32")[1] if direction == "import" else converted()
    dst = tmp_path / "dst"
    cmd = [sys.executable, "-m", "tests.checkpoint.worker", direction, str(src), str(dst)]
    proc = subprocess.run([*cmd, "--kill-after", "40", "--max-shard-size", "40KB"], cwd=REPO)
    assert proc.returncode == -9
    assert not dst.exists()
    (tmp,) = tmp_path.iterdir()
    assert tmp.name.startswith(".dst.tmp-")
    with pytest.raises(CheckpointError, match="interrupted"):
        load(tmp)
