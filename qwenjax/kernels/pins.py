"""What `backend="auto"` is pinned to while tracing, per thread (each kernel api's
`auto_backend`).

Per thread, because the serving scheduler traces its programs on its own thread while others
set and lift pins: a shared stack would let one thread's pin reach another's trace, or outlive
its block when a trace saved and restored it meanwhile. An engine or scheduler carries the pins
it was built under to the thread that traces (`qwenjax.inference.engine.StaticGraph`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class PinStack(threading.local):
    """This thread's pins, innermost last."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def top(self) -> str | None:
        return self.names[-1] if self.names else None

    @contextlib.contextmanager
    def pushed(self, name: str) -> Iterator[None]:
        self.names.append(name)
        try:
            yield
        finally:
            self.names.pop()
