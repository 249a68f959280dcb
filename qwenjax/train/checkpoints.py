"""Training checkpoints: orbax, async, keep-last-N plus best, resumable on a different mesh.

A checkpoint holds the train state pytree (parameters, optimizer state, step, RNG) and the data
iterator's state (JSON). Restoring passes an abstract target whose leaves carry the *current*
run's shardings, so a run saved on one mesh shape resumes on another. Orbax writes each step to a
temporary directory and renames it when complete: an interrupted save is never restored.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When and what to keep. `best_metric` (e.g. "eval/loss", lower is better) keeps the best."""

    every_steps: int = 500
    keep_last: int = 3
    best_metric: str | None = None
    keep_best: int = 1
    async_save: bool = True


class Checkpointer:
    """Saves and restores `(state, data_state)` under `run_dir/checkpoints/<step>`."""

    def __init__(self, run_dir: str | Path, config: CheckpointConfig):
        self.config = config
        best = config.best_metric
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_last + (config.keep_best if best else 0),
            keep_period=None,
            best_fn=(lambda metrics: metrics[best]) if best else None,
            best_mode="min",
            keep_checkpoints_without_metrics=True,
            enable_async_checkpointing=config.async_save,
            create=True,
        )
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.config.every_steps == 0

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict,
        metrics: dict[str, float] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Start saving (async by default); returns whether a save was started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """`(state, data_state, step)` from `step` (default: the latest complete one).

        `abstract_state` leaves are `jax.ShapeDtypeStruct`s with the shardings wanted now.
        """
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"], step

    def wait(self) -> None:
        """Block until any async save has been committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """Shape/dtype/sharding skeleton of a live state (the restore target for the same mesh)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


class StopRequested:
    """Turns SIGTERM / SIGINT into a flag the loop polls, so a pre-empted VM saves and exits.

    On several processes, every process must agree to stop at the same step (they all save
    their shards): the loop reduces the flag across processes before acting on it.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._event = threading.Event()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
