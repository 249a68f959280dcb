"""Random-access record sources for the data pipeline: JSONL files and ArrayRecord files.

Both yield one raw JSON document (bytes) per record; `data.py` decodes and tokenises them. Random
access is what lets grain shuffle globally, shard by host and checkpoint a position cheaply.
"""

from __future__ import annotations

import glob
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np

_ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Files named by paths and glob patterns, each pattern's matches sorted.

    Raises:
        FileNotFoundError: A path does not exist or a pattern matches nothing.
    """
    patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    if not patterns:
        raise ValueError("no data paths given")
    files = []
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"data pattern {pattern!r} matches no files")
            files += matches
        elif Path(pattern).is_file():
            files.append(pattern)
        else:
            raise FileNotFoundError(f"data file {pattern!r} does not exist")
    return files


class JsonlSource:
    """The non-empty lines of JSONL files, by index, as bytes (grain `RandomAccessDataSource`).

    Line starts are found once with a vectorised scan of the memory-mapped files, so opening a
    large file costs one pass over its bytes and 16 bytes of index per line.
    """

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)
        starts, ends, file_ids = [], [], []
        for file_id, path in enumerate(self._paths):
            s, e = _line_bounds(path)
            starts.append(s)
            ends.append(e)
            file_ids.append(np.full(len(s), file_id, np.int32))
        self._starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self._ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        self._file_ids = np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> bytes:
        # grain reads with several threads: positional reads share no file offset.
        file_id = int(self._file_ids[index])
        fd = self._fds.get(file_id)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file_id)
                if fd is None:
                    fd = self._fds[file_id] = os.open(self._paths[file_id], os.O_RDONLY)
        start = int(self._starts[index])
        return os.pread(fd, int(self._ends[index]) - start, start)

    def __getstate__(self) -> dict:
        # Descriptors and locks do not pickle (grain worker processes); they reopen lazily.
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _fds={}, _lock=threading.Lock())

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def __repr__(self) -> str:
        return f"JsonlSource({len(self._paths)} files, {len(self)} records)"


def _line_bounds(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of the non-blank lines of a file, line terminators excluded."""
    size = os.path.getsize(path)
    if size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = np.frombuffer(mm, np.uint8)
        newlines = np.flatnonzero(data == ord("\n"))
        starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
        ends = np.concatenate([newlines, [size]]).astype(np.int64)
        # Drop a "\r" before "\n" so CRLF files decode like LF files.
        crlf = (ends > starts) & (data[np.maximum(ends - 1, 0)] == ord("\r"))
        ends = ends - crlf
        del data  # release the buffer before the mmap closes
    keep = ends > starts
    return starts[keep], ends[keep]


def open_records(patterns: str | Sequence[str]) -> grain.MapDataset:
    """A grain MapDataset of raw JSON records (bytes) from JSONL and ArrayRecord files.

    Files ending in `.array_record` are read with grain's `ArrayRecordDataSource` (one JSON
    document per record); all other files are JSONL. Records come in the order of the expanded
    paths, JSONL files before ArrayRecord files.
    """
    files = expand_paths(patterns)
    array_record = [f for f in files if f.endswith(_ARRAY_RECORD_SUFFIXES)]
    jsonl = [f for f in files if not f.endswith(_ARRAY_RECORD_SUFFIXES)]
    parts = []
    if jsonl:
        parts.append(grain.MapDataset.source(JsonlSource(jsonl)))
    if array_record:
        parts.append(grain.MapDataset.source(grain.sources.ArrayRecordDataSource(array_record)))
    return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
