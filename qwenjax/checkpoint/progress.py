"""A one-line-per-tensor progress report on stderr (a single updating line on a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


class Progress:
    """Counts tensors and bytes: `update(name, nbytes)` after each tensor, `close()` at the end."""

    def __init__(
        self,
        what: str,
        total_tensors: int,
        total_bytes: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
    ):
        self.what, self.total_tensors, self.total_bytes = what, total_tensors, total_bytes
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.enabled and self.stream.isatty()
        self.tensors = self.bytes = 0
        self.start = time.perf_counter()

    def update(self, name: str, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        if not self.enabled:
            return
        width = len(str(self.total_tensors))
        line = (
            f"{self.what} [{self.tensors:{width}d}/{self.total_tensors}] "
            f"{_mb(self.bytes)} / {_mb(self.total_bytes)}  {name}"
        )
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        seconds = time.perf_counter() - self.start
        rate = self.bytes / max(seconds, 1e-9)
        end = "\n" if self.tty else ""
        self.stream.write(
            f"{end}{self.what}: {self.tensors} tensors, {_mb(self.bytes)} in {seconds:.1f} s "
            f"({_mb(int(rate))}/s)\n"
        )
        self.stream.flush()
