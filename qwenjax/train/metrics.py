"""Training metrics: a console progress line, `metrics.jsonl` and TensorBoard event files.

Only the main process writes; other processes get a logger that does nothing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from qwenjax.distributed import is_main_process


class MetricsLogger:
    """Writes one record per logging step to every sink."""

    def __init__(self, run_dir: str | Path, total_steps: int, *, tensorboard: bool = True):
        self.enabled = is_main_process()
        self.total = total_steps
        self.start = time.perf_counter()
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (kept open for the run)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any], *, prefix: str = "train") -> None:
        """Record `metrics` (Python scalars) at `step` and refresh the console line."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.perf_counter() - self.start, 3)}
        record.update({f"{prefix}/{k}": _scalar(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        self._console(step, metrics, prefix)

    def _console(self, step: int, metrics: dict[str, Any], prefix: str) -> None:
        width = 24
        done = int(width * step / max(self.total, 1))
        bar = "█" * done + "·" * (width - done)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        end = "\n" if prefix != "train" or step >= self.total else "\r"
        print(f"{prefix} [{bar}] {step}/{self.total} {shown}", end=end, file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        """A line of its own (checkpoint saved, resumed, …) on the main process."""
        if self.enabled:
            print(f"\n{text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _scalar(v: Any) -> Any:
    try:
        return float(v) if not isinstance(v, int | str) else v
    except TypeError:
        return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
