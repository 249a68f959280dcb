"""HF safetensors ⇄ qwenjax checkpoints, streamed one tensor at a time, and `load` from either.

The key table (`hf_keys.table`) says which HF tensor(s) make each of our parameters; this module
only moves bytes: it checks the whole HF key set against the table before reading any data,
then fills one parameter at a time (a stacked parameter block by block) and hands it to a
writer, so peak host memory is a small multiple of the largest parameter, never the model.

`dtype=None` keeps every tensor's dtype, so HF → qwenjax → HF reproduces the files bit for bit
(tensor bytes, dtypes, keys and `config.json`); a dtype casts every parameter.

The vision tower (`model.visual.*` ⇄ our `visual/…`) is converted whenever the checkpoint has it;
`load` reads it only with `vision=True` and otherwise skips it without reading a byte.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax import sharding
from qwenjax.api import build
from qwenjax.checkpoint import orbax_io
from qwenjax.checkpoint.hf_io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    SafetensorsReader,
    ShardedWriter,
    TensorSpec,
    atomic_directory,
    check_tensors,
    raise_problems,
    read_tensor,
)
from qwenjax.checkpoint.hf_keys import TEXT_PREFIX, VISUAL_PREFIX, VLM_PREFIX, Entry, table
from qwenjax.checkpoint.progress import Progress
from qwenjax.config import ModelConfig
from qwenjax.model import Qwen35

LAYOUTS = {TEXT_PREFIX: "text", VLM_PREFIX: "vlm"}
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".safetensors.index.json",
    ".bin",
    ".bin.index.json",
    ".pt",
    ".pth",
    ".gguf",
    ".h5",
    ".msgpack",
)


def _param_shapes(config: ModelConfig, vision: bool = False) -> dict[tuple, tuple[int, ...]]:
    state = nnx.state(build(config, abstract=True, vision=vision), nnx.Param)
    return {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}


def _float_dtype(dtype: jnp.dtype | str | None) -> np.dtype | None:
    if dtype is None:
        return None
    d = jnp.dtype(dtype)
    if not jnp.issubdtype(d, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype (bfloat16, float32, …), got {d}")
    return d


def _check_distinct(src: Path, dst: Path) -> None:
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ValueError(f"source {src} and destination {dst} must not contain each other")


def _kind(path: Path) -> str:
    """Which checkpoint `path` holds, "qwenjax" or "hf"; anything else is an error."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if orbax_io.is_qwenjax_checkpoint(path):
        return "qwenjax"
    if (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file():
        return "hf"
    raise CheckpointError(
        f"{path} is not a checkpoint: it has neither {orbax_io.MANIFEST} (a qwenjax checkpoint) "
        f"nor {SINGLE_FILE} / {INDEX_FILE} (a HF checkpoint); is it an interrupted conversion?"
    )


def _copy_side_files(src: Path, dst: Path, skip: Callable[[str], bool]) -> None:
    """Copy the top-level non-weight files (config, tokenizer, templates, …) verbatim."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not skip(f.name):
            shutil.copy2(f, dst / f.name)


def _check_vision(config: ModelConfig, vision: bool, src: Path) -> None:
    if vision and config.vision is None:
        raise CheckpointError(
            f"{src}: config.json has no vision_config, so there is no vision tower to load "
            "(load it with vision=False)"
        )


# ---------------------------------------------------------------------- HF side
def _open_hf(
    src: Path, vision: bool | None = False
) -> tuple[SafetensorsReader, ModelConfig, list[Entry]]:
    """Config, headers and table of a HF checkpoint, checked for completeness before any data.

    `vision`: include the vision tower (True), skip it (False), or include it when the
    checkpoint has one (None).
    """
    config = ModelConfig.from_hf(src)
    reader = SafetensorsReader(src)
    if vision is None:
        has_visual = any(k.startswith(VISUAL_PREFIX) for k in reader.tensors)
        vision = config.vision is not None and has_visual
    _check_vision(config, vision, src)
    entries = table(_param_shapes(config, vision), config, reader.prefix)
    problems = check_tensors({k: e.hf_shape for e in entries for k in e.hf_keys}, reader.tensors)
    for e in entries:  # the blocks of one stacked parameter must agree on dtype
        found = {k: reader.tensors[k].dtype for k in e.hf_keys if k in reader.tensors}
        if len(set(found.values())) > 1:
            listing = ", ".join(f"{k}: {d}" for k, d in found.items())
            problems.append(f"mixed dtypes in one stacked parameter: {listing}")
    raise_problems(problems, f"HF checkpoint {src} does not match its config.json")
    return reader, config, entries


def _read_leaf(
    reader: SafetensorsReader, e: Entry, dtype: np.dtype | None, progress: Progress
) -> np.ndarray:
    """One parameter in our layout, assembled from its HF tensor(s) one tensor at a time."""
    infos = [reader.tensors[k] for k in e.hf_keys]
    leaf = np.empty(e.shape, dtype or infos[0].dtype)
    for b, info in enumerate(infos):
        part = leaf[b] if e.stacked else leaf
        part[...] = e.to_ours(read_tensor(info))  # casts when dtype is given
        progress.update(info.key, info.nbytes)
    return leaf


def _dtype_summary(dtypes: list[np.dtype]) -> dict:
    names = sorted({str(d) for d in dtypes})
    return {
        "dtype": names[0] if len(names) == 1 else "mixed",
        "param_dtypes": {n: sum(str(d) == n for d in dtypes) for n in names},
    }


def hf_to_qwenjax(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: jnp.dtype | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a HF checkpoint directory (text or VLM layout, MTP and vision tower included).

    The tensors must be exactly the set the config implies (the vision tower's only if the
    checkpoint has any `model.visual.*`); all mismatches are reported in one `CheckpointError`.

    Args:
      src: HF directory (`config.json` + `model.safetensors` or an index and shards).
      dst: the directory to create; written beside it first and renamed when complete.
      dtype: cast every parameter to this dtype; None keeps the checkpoint's dtypes.
      overwrite: replace an existing `dst`.
      progress: report each tensor on stderr.

    Returns:
      The destination path.
    """
    src, dst = Path(src), Path(dst)
    _check_distinct(src, dst)
    target = _float_dtype(dtype)
    reader, _, entries = _open_hf(src, vision=None)
    infos = [reader.tensors[k] for e in entries for k in e.hf_keys]
    bar = Progress("import", len(infos), sum(i.nbytes for i in infos), enabled=progress)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        _copy_side_files(src, tmp, skip=lambda name: name.endswith(_WEIGHT_SUFFIXES))
        writer = orbax_io.ParamWriter(tmp)
        dtypes = []
        for e in entries:
            leaf = _read_leaf(reader, e, target, bar)
            dtypes.append(leaf.dtype)
            writer.add(e.path, leaf)
            del leaf  # the writer holds it until written: only one copy is ever alive
        writer.close()
        bar.close()
        orbax_io.write_manifest(
            tmp,
            **_dtype_summary(dtypes),
            hf_layout=LAYOUTS[reader.prefix],
            hf_prefix=reader.prefix,
            vision=any(e.path[0] == "visual" for e in entries),
            num_params=len(entries),
            num_hf_tensors=len(infos),
        )
    return dst


# ---------------------------------------------------------------------- qwenjax side
# Version-1 checkpoints stored these `[..., D, N, H]`; the model now holds them `[..., D, N·H]`.
V1_SPLIT_HEADS = {"q_proj", "k_proj", "v_proj", "in_proj_z"}


def _split_in_v1(key: tuple[str, ...], stored: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Whether a version-1 leaf `stored` is `want` with its last dim split into heads."""
    joined = (*stored[:-2], stored[-2] * stored[-1]) if len(stored) >= 2 else stored
    return key[-1] in V1_SPLIT_HEADS and joined == want


def _read_leaves(src: Path, entries: list[Entry]) -> Iterator[tuple[tuple, np.ndarray]]:
    """Our stored leaves in table order, in the model's shapes (version 1's split heads joined)."""
    leaves = orbax_io.iter_leaves(src, [e.path for e in entries])
    for e, (path, leaf) in zip(entries, leaves, strict=True):
        yield path, leaf.reshape(e.shape)


def _open_qwenjax(src: Path, vision: bool | None = False) -> tuple[ModelConfig, list[Entry], dict]:
    """Config, table and stored leaf shapes/dtypes of one of our checkpoints, cross-checked.

    `vision` as for `_open_hf`: stored vision leaves are skipped when it is False.
    """
    manifest = orbax_io.read_manifest(src)
    prefix = manifest.get("hf_prefix")
    if prefix not in LAYOUTS:
        raise CheckpointError(f"{src}: unknown hf_prefix {prefix!r} in the manifest")
    config = ModelConfig.from_hf(src)
    stored = orbax_io.leaf_info(src)
    has_visual = any(k[0] == "visual" for k in stored)
    if vision is None:
        vision = config.vision is not None and has_visual
    _check_vision(config, vision, src)
    if vision and not has_visual:
        raise CheckpointError(f"{src} holds no vision tower weights (load it with vision=False)")
    entries = table(_param_shapes(config, vision), config, prefix)
    left = {k: v for k, v in stored.items() if vision or k[0] != "visual"}
    problems = []
    for e in entries:
        key = tuple(map(str, e.path))
        found = left.pop(key, None)
        if found is not None and manifest["version"] == 1 and _split_in_v1(key, found[0], e.shape):
            found = (e.shape, found[1])
        if found is None or found[0] != e.shape:
            got = "not found" if found is None else f"found {list(found[0])}"
            problems.append(f"{'/'.join(key)}: expected {list(e.shape)}, {got}")
    problems += [f"{'/'.join(k)}: unexpected, found {list(s)}" for k, (s, _) in left.items()]
    raise_problems(problems, f"qwenjax checkpoint {src} does not match its config.json")
    return config, entries, stored


def qwenjax_to_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: jnp.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export one of our checkpoints to HF safetensors, with the keys and layout it came from.

    Args:
      src: a qwenjax checkpoint directory.
      dst: the HF directory to create (written beside it, renamed when complete).
      dtype: cast every tensor; None keeps each parameter's stored dtype.
      max_shard_size: shard size limit, e.g. "5GB" (decimal units, as transformers) or "4GiB".
      overwrite: replace an existing `dst`.
      progress: report each tensor on stderr.

    Returns:
      The destination path.
    """
    src, dst = Path(src), Path(dst)
    _check_distinct(src, dst)
    _, entries, stored = _open_qwenjax(src, vision=None)
    dtypes = {e.path: stored[tuple(map(str, e.path))][1] for e in entries}
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        _copy_side_files(src, tmp, skip=lambda name: name == orbax_io.MANIFEST)
        leaves = _read_leaves(src, entries)
        _write_hf(tmp, entries, dtypes, leaves, _float_dtype(dtype), max_shard_size, progress)
    return dst


def _write_hf(
    directory: Path,
    entries: list[Entry],
    dtypes: dict[tuple, np.dtype],
    leaves: Iterable[tuple[tuple, np.ndarray]],
    target: np.dtype | None,
    max_shard_size: int | str,
    progress: bool,
) -> None:
    """Stream `(path, our array)` pairs into HF shards (headers planned from the table)."""
    specs = [
        TensorSpec(k, target or dtypes[e.path], e.hf_shape) for e in entries for k in e.hf_keys
    ]
    by_path = {e.path: e for e in entries}
    bar = Progress("export", len(specs), sum(s.nbytes for s in specs), enabled=progress)
    writer = ShardedWriter(directory, specs, max_shard_size)
    for path, leaf in leaves:
        e = by_path[path]
        for b, key in enumerate(e.hf_keys):
            w = e.to_hf(leaf[b] if e.stacked else leaf)
            w = w if target is None else w.astype(target)
            writer.write(key, w)
            bar.update(key, w.nbytes)
        del leaf
    writer.close()
    bar.close()


def save_hf(
    model: Qwen35,
    dst: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write an in-memory model as a HF text checkpoint (`Qwen3_5ForCausalLM` layout + `mtp.*`).

    Parameters are pulled to the host one at a time, so host memory stays at one parameter. A
    vision tower, if the model has one, is not written (the text layout has no place for it).
    """
    dst = Path(dst)
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    flat = {tuple(p): v for p, v in state if p[0] != "visual"}
    entries = table(
        {p: tuple(v.get_value().shape) for p, v in flat.items()}, model.config, TEXT_PREFIX
    )
    dtypes = {p: np.dtype(v.get_value().dtype) for p, v in flat.items()}
    leaves = ((e.path, np.asarray(jax.device_get(flat[e.path].get_value()))) for e in entries)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2) + "\n")
        _write_hf(tmp, entries, dtypes, leaves, None, max_shard_size, progress)
    return dst


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: jnp.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """HF → qwenjax or qwenjax → HF, chosen by what `src` is (`max_shard_size` is for export)."""
    if _kind(Path(src)) == "qwenjax":
        return qwenjax_to_hf(
            src,
            dst,
            dtype=dtype,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            progress=progress,
        )
    return hf_to_qwenjax(src, dst, dtype=dtype, overwrite=overwrite, progress=progress)


# ---------------------------------------------------------------------- load
def _merge(
    config: ModelConfig, compute: np.dtype, arrays: dict[tuple, jax.Array], vision: bool
) -> Qwen35:
    graphdef, state = nnx.split(build(config, dtype=compute, abstract=True, vision=vision))
    flat = [(p, v.replace(value=arrays[tuple(p)])) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load(
    path: str | os.PathLike,
    *,
    dtype: jnp.dtype | str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
    vision: bool | None = False,
) -> Qwen35:
    """A model from a HF checkpoint directory or one of ours (told apart by `qwenjax.json`).

    `vision=True` loads a VLM checkpoint with its vision tower, as a `Qwen35VL`; by default the
    text model is loaded and the vision tower's tensors are never read; `vision=None` loads the
    vision tower when the checkpoint has one.

    Parameters are read one at a time and placed as they arrive, so host memory peaks at the
    model's share on this host plus about one parameter. (A single orbax restore of the whole
    tree measured ~1.3× the model on the host.) `dtype=None` keeps the checkpoint's parameter
    dtypes and computes in the embedding's dtype; a dtype casts every parameter and is the
    compute dtype.

    With `mesh` (and `rules`, default `sharding.RULES["fsdp"]`), each parameter goes straight to
    its shards by the logical rules: no device ever holds an unsharded copy, and on a multi-host
    mesh each host transfers only the shards of its own devices. Without, every parameter goes
    to this process's first device.

    Raises:
      CheckpointError: an incomplete, corrupt or mismatched checkpoint (names what is wrong).
      ValueError: a mesh that does not divide the model (every offending dimension listed).
    """
    path = Path(path)
    target = _float_dtype(dtype)
    if _kind(path) == "qwenjax":
        config, entries, _ = _open_qwenjax(path, vision)
        leaves = (
            (p, leaf if target is None else leaf.astype(target))
            for p, leaf in _read_leaves(path, entries)
        )
    else:
        reader, config, entries = _open_hf(path, vision)
        off = Progress("load", 0, 0, enabled=False)
        leaves = ((e.path, _read_leaf(reader, e, target, off)) for e in entries)
    vision = any(e.path[0] == "visual" for e in entries)  # None resolved by the table
    place = _placer(config, mesh, rules, vision)
    arrays = {p: place(p, leaf) for p, leaf in leaves}
    return _merge(config, target or arrays[("embed_tokens",)].dtype, arrays, vision)


def _placer(config: ModelConfig, mesh: jax.sharding.Mesh | None, rules: Any, vision: bool):
    """`(path, numpy leaf) -> jax.Array` on one device, or sharded over `mesh` by `rules`."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return lambda path, leaf: jax.device_put(leaf, device)
    rules = sharding.RULES["fsdp"] if rules is None else rules
    abstract = nnx.state(build(config, abstract=True, vision=vision))
    by_path = {
        tuple(p): v.get_value()
        for p, v in nnx.to_flat_state(sharding.param_shardings(abstract, mesh, rules))
    }

    def place(path, leaf):
        # Each process fills only its addressable shards from its host copy of the leaf.
        return jax.make_array_from_callback(leaf.shape, by_path[tuple(path)], lambda i: leaf[i])

    return place
