"""Streaming safetensors I/O for Hugging Face checkpoint directories.

A safetensors file is `[u64 little-endian header length n][n bytes of JSON header][raw bytes]`;
the header maps each key to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the
end of the header) plus an optional `"__metadata__"`. We parse headers ourselves and read or write
one tensor at a time with plain file I/O: memory-mapping a 5 GB shard would put every page we touch
into the resident set, so peak memory would grow with the shard instead of with the tensor.

A checkpoint directory holds `model.safetensors`, or `model.safetensors.index.json` (its
`weight_map` names the shard of every key) and the shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from qwenjax.checkpoint.hf_keys import TEXT_PREFIX, VISUAL_PREFIX, VLM_PREFIX

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the limit the reference implementation enforces

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint is incomplete, corrupt, or does not match the model configuration."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte offset."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header, without reading tensor data.

    Raises:
      CheckpointError: naming the file, if it is truncated or its header is malformed.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path}: corrupt or truncated header (length {n} in a {size}-byte file)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    tensors = {}
    for key, spec in header.items():
        try:
            dtype, shape = DTYPES[spec["dtype"]], tuple(int(d) for d in spec["shape"])
            begin, end = (int(o) for o in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad header entry for {key!r}: {spec!r}") from e
        info = TensorInfo(key, dtype, shape, path, data_start + begin)
        if end - begin != info.nbytes or begin < 0:
            raise CheckpointError(
                f"{path}: {key!r} has {end - begin} data bytes but shape {list(shape)} "
                f"{spec['dtype']} needs {info.nbytes}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: {key!r} ends at byte {end} of the data section but the file "
                f"holds only {data_size} data bytes"
            )
        tensors[key] = info
    return tensors


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor's bytes into a fresh array."""
    out = np.empty(info.shape, info.dtype)
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        got = f.readinto(out.reshape(-1).view(np.uint8))
    if got != info.nbytes:
        raise CheckpointError(f"{info.file}: truncated while reading {info.key!r}")
    return out


class SafetensorsReader:
    """A HF checkpoint directory: every tensor's location from the headers; data on demand."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map, files = {}, [SINGLE_FILE]
        else:
            raise CheckpointError(
                f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} (not a HF checkpoint, or an "
                "interrupted export)"
            )
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            shard = self.directory / name
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard {name} does not exist")
            for key, info in read_header(shard).items():
                if key in self.tensors:
                    raise CheckpointError(
                        f"{key!r} is in both {self.tensors[key].file} and {shard}"
                    )
                self.tensors[key] = info
        for key, name in weight_map.items():
            if key not in self.tensors or self.tensors[key].file.name != name:
                raise CheckpointError(f"{index}: {key!r} is not in its shard {name}")

    @property
    def prefix(self) -> str:
        """`model.language_model.` for the VLM layout, else `model.`."""
        vlm = any(k.startswith(VLM_PREFIX) for k in self.tensors)
        return VLM_PREFIX if vlm else TEXT_PREFIX

    def read(self, key: str) -> np.ndarray:
        return read_tensor(self.tensors[key])


def check_tensors(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, TensorInfo]
) -> list[str]:
    """Missing, unexpected and mis-shaped tensors, one line each.

    `model.visual.*` tensors that are not expected are not unexpected: a text-only load of a VLM
    checkpoint skips them.
    """
    problems = []
    for key, shape in expected.items():
        if key not in found:
            problems.append(f"missing     {key}: expected {list(shape)}, not found")
        elif found[key].shape != tuple(shape):
            problems.append(
                f"mis-shaped  {key}: expected {list(shape)}, found {list(found[key].shape)} "
                f"in {found[key].file.name}"
            )
    for key, info in found.items():
        if key not in expected and not key.startswith(VISUAL_PREFIX):
            problems.append(
                f"unexpected  {key}: expected nothing, found {list(info.shape)} in {info.file.name}"
            )
    return problems


def raise_problems(problems: Sequence[str], what: str, limit: int = 60) -> None:
    """Raise one `CheckpointError` listing every problem (the first `limit` of them)."""
    if not problems:
        return
    lines = list(problems[:limit])
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    raise CheckpointError(f"{what}: {len(problems)} problem(s):\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------------- writing
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in `"5GB"` (decimal, as transformers counts), `"50KiB"` (binary) or an int."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(size)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (examples: 5GB, 500MB, 50KiB, 1000)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: key, dtype and shape (known before any data is produced)."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most `max_shard_size` bytes (or one tensor)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header_bytes(specs: Sequence[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        dtype = DTYPE_NAMES[np.dtype(s.dtype)]
        header[s.key] = {
            "dtype": dtype,
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes tensors to safetensors shards as they arrive, in the order given up front.

    Each shard's header is written when its first tensor arrives (every shape and dtype is known
    from `specs`), then each tensor's bytes are appended, so only the tensor being written is in
    memory. `close()` writes `model.safetensors.index.json` when there is more than one shard.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        specs: Sequence[TensorSpec],
        max_shard_size: int | str = "5GB",
    ):
        self.directory = Path(directory)
        self.shards = plan_shards(list(specs), parse_size(max_shard_size))
        n = len(self.shards)
        self.names = (
            [SINGLE_FILE]
            if n == 1
            else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )
        self._order = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._file = None

    def write(self, key: str, array: np.ndarray) -> None:
        """Append the next tensor; `key`, dtype and shape must be the next ones planned."""
        if self._next >= len(self._order):
            raise ValueError(f"{key!r}: all {len(self._order)} planned tensors are written")
        i, spec = self._order[self._next]
        if (key, np.dtype(array.dtype), tuple(array.shape)) != (
            spec.key,
            np.dtype(spec.dtype),
            spec.shape,
        ):
            raise ValueError(
                f"expected {spec.key!r} {np.dtype(spec.dtype)} {list(spec.shape)}, got {key!r} "
                f"{array.dtype} {list(array.shape)}"
            )
        if spec is self.shards[i][0]:
            self._file = open(self.directory / self.names[i], "wb")  # noqa: SIM115
            self._file.write(_header_bytes(self.shards[i]))
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        if spec is self.shards[i][-1]:
            self._file.close()
            self._file = None
        self._next += 1

    def close(self) -> None:
        """Check that every planned tensor was written and write the index."""
        if self._file is not None:
            self._file.close()
        if self._next != len(self._order):
            raise ValueError(
                f"only {self._next} of {len(self._order)} planned tensors were written"
            )
        if len(self.shards) > 1:
            index = {
                "metadata": {
                    "total_parameters": sum(math.prod(s.shape) for _, s in self._order),
                    "total_size": sum(s.nbytes for _, s in self._order),
                },
                "weight_map": {s.key: self.names[i] for i, s in self._order},
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_safetensors(
    directory: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    max_shard_size: int | str = "5GB",
) -> None:
    """Write in-memory tensors as a (possibly sharded) checkpoint; for small data and tests."""
    writer = ShardedWriter(
        directory, [TensorSpec(k, v.dtype, v.shape) for k, v in tensors.items()], max_shard_size
    )
    for key, value in tensors.items():
        writer.write(key, value)
    writer.close()


# ---------------------------------------------------------------------- atomic directories
@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `dst` that becomes `dst` only if the body completes.

    On an exception the temporary directory is removed; if the process is killed it is left
    behind under a hidden `.NAME.tmp-*` name, never at `dst`.

    Raises:
      FileExistsError: `dst` exists and `overwrite` is False.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dst.parent / f".{dst.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():  # overwrite: move the old one aside first so dst is never half-written
        old = dst.parent / f".{dst.name}.old-{tag}"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(dst)
