"""The qwenjax checkpoint directory, written and read one parameter (or a few small ones) at a time.

    DIR/config.json, tokenizer.json, …   the HF checkpoint's other files, copied verbatim
    DIR/params/                          orbax checkpoint of the parameter tree in our layout
                                         (nested dict keyed like the NNX state; blocks stacked)
    DIR/qwenjax.json                     manifest, written last: a directory without it is
                                         an interrupted write

Writing uses orbax's partial save (`ocp.v1.partial.save` per batch of leaves, then `finalize`),
so earlier leaves are on disk and freed before later ones are made: measured, the peak memory of
a conversion is ~2.7× its largest parameter and does not grow with the number of leaves. Reading
one batch at a time passes orbax an abstract tree whose other leaves are `PLACEHOLDER`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from qwenjax.checkpoint.hf_io import CheckpointError

MANIFEST = "qwenjax.json"
PARAMS = "params"
FORMAT = "qwenjax"
# Version 2 stores the attention q/k/v and GDN z projections 2-D (`[D, N·H]`); version 1
# stored them `[D, N, H]`, and is still read (`convert.py` flattens them as they load).
VERSION = 2
READS_VERSIONS = (1, 2)
# Leaves are grouped into one orbax call up to this many bytes: a call costs ~50 ms, so a tiny
# model's 70 leaves go in one call, while a 27B model's GB-sized leaves each go alone.
BATCH_BYTES = 16 * 2**20

ParamPath = tuple[str | int, ...]


def _orbax_context() -> ocp.Context:
    """Orbax options for our params: uncompressed (weights barely compress; measured, zstd
    doubles the transient memory of writing a leaf and slows conversion)."""
    ctx = ocp.Context()
    ctx.array.saving.use_compression = False
    return ctx


def nest(flat: Mapping[ParamPath, Any]) -> dict:
    """`{('a', 0, 'b'): x}` → `{'a': {0: {'b': x}}}`."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = leaf
    return out


def _str_path(path: Sequence[Any]) -> tuple[str, ...]:
    """A path as orbax reports it (dict keys come back as strings)."""
    return tuple(str(getattr(p, "key", p)) for p in path)


def _batches(items: Iterable[tuple[Any, int]], limit: int) -> Iterator[list[Any]]:
    """Consecutive groups whose sizes add up to at most `limit` (or one oversized item)."""
    batch: list[Any] = []
    size = 0
    for item, nbytes in items:
        if batch and size + nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += nbytes
    if batch:
        yield batch


def _params_dir(directory: str | os.PathLike) -> Path:
    """`DIR/params`, absolute: orbax refuses a relative path, and its metadata read does so
    with only a logged warning, returning an empty tree (every parameter then "not found")."""
    return Path(directory).absolute() / PARAMS


class ParamWriter:
    """Adds parameters to `DIR/params` one at a time; `close()` finalizes the orbax checkpoint."""

    def __init__(self, directory: str | os.PathLike, batch_bytes: int | None = None):
        self.path = _params_dir(directory)
        self.batch_bytes = BATCH_BYTES if batch_bytes is None else batch_bytes
        self._batch: dict[ParamPath, np.ndarray] = {}
        self._size = 0

    def add(self, path: ParamPath, array: np.ndarray) -> None:
        """Queue one parameter; it is written (and released) once the batch is full."""
        self._batch[tuple(path)] = array
        self._size += array.nbytes
        if self._size >= self.batch_bytes:  # flush now, before the caller allocates the next one
            self._flush()

    def _flush(self) -> None:
        with _orbax_context():
            ocp.partial.save(self.path, nest(self._batch))
        self._batch, self._size = {}, 0

    def close(self) -> None:
        if self._batch:
            self._flush()
        with _orbax_context():
            ocp.partial.finalize(self.path)


def write_manifest(directory: str | os.PathLike, **fields: Any) -> None:
    """Write the manifest; call last, it marks the directory complete."""
    manifest = {"format": FORMAT, "version": VERSION, **fields}
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def is_qwenjax_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` looks like one of ours, complete or interrupted."""
    d = Path(directory)
    return any((d / name).exists() for name in (MANIFEST, PARAMS, PARAMS + ".partial_save"))


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete qwenjax checkpoint.

    Raises:
      CheckpointError: no manifest (an interrupted write), or an unknown format or version.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: incomplete qwenjax checkpoint (no {MANIFEST}); the conversion that "
            "wrote it was interrupted: convert again"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT or manifest.get("version") not in READS_VERSIONS:
        raise CheckpointError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this qwenjax reads {FORMAT!r} versions {list(READS_VERSIONS)}"
        )
    return manifest


def _metadata_tree(directory: str | os.PathLike) -> Any:
    path = _params_dir(directory)
    try:
        tree = ocp.metadata(path).metadata
    except Exception as e:  # orbax raises several types for a missing or damaged tree
        raise CheckpointError(f"{path}: cannot read the orbax tree ({e})") from e
    if tree is None:  # orbax logs why and returns nothing
        raise CheckpointError(f"{path}: cannot read the orbax tree (no metadata)")
    return tree


def leaf_info(
    directory: str | os.PathLike,
) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every stored parameter, keyed by its path (as strings)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(_metadata_tree(directory))
    return {_str_path(p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in flat}


def iter_leaves(
    directory: str | os.PathLike,
    paths: Sequence[ParamPath],
    batch_bytes: int | None = None,
) -> Iterator[tuple[ParamPath, np.ndarray]]:
    """Yield `(path, numpy array)` for `paths`, in order, reading a small batch at a time."""
    tree = _metadata_tree(directory)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = [_str_path(p) for p, _ in flat]
    index = {k: i for i, k in enumerate(keys)}
    sizes = [int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for _, m in flat]
    limit = BATCH_BYTES if batch_bytes is None else batch_bytes
    for batch in _batches(((p, sizes[index[_str_path(p)]]) for p in paths), limit):
        wanted = {index[_str_path(p)] for p in batch}
        abstract = [m if i in wanted else ocp.PLACEHOLDER for i, (_, m) in enumerate(flat)]
        loaded = jax.tree_util.tree_leaves(
            ocp.load(_params_dir(directory), jax.tree_util.tree_unflatten(treedef, abstract)),
            is_leaf=lambda x: x is ocp.PLACEHOLDER,
        )
        arrays = {keys[i]: np.asarray(a) for i, a in enumerate(loaded) if i in wanted}
        del loaded
        for p in batch:
            yield p, arrays.pop(_str_path(p))
