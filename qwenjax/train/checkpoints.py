"""Training checkpoints: orbax, async, keep-last-N plus best, resumable on a different mesh.

A checkpoint holds the train state pytree (parameters, optimizer state, step, RNG) and the data
iterator's state (JSON). Restoring passes an abstract target whose leaves carry the *current*
run's shardings, so a run saved on one mesh shape resumes on another. Orbax writes each step to a
temporary directory and renames it when complete: an interrupted save is never restored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
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
        # Handlers named up front, so that a new manager reads a checkpoint's metadata.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

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
        target = self._as_stored(step, abstract_state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
            ),
        )
        state = restored["state"]
        pairs = zip(jax.tree.leaves(target), jax.tree.leaves(abstract_state), strict=True)
        if split := sum(a.shape != b.shape for a, b in pairs):
            state = jax.tree.map(_reshaped, state, abstract_state)
            logging.getLogger(__name__).warning(
                "checkpoint step %d: %d leaves stored with their last dim split (an earlier "
                "layout) were reshaped to this run's",
                step,
                split,
            )
        return state, restored["data"], step

    def _as_stored(self, step: int, abstract_state: Any) -> Any:
        """The restore target: `abstract_state`, except for leaves stored splitting the last
        dim of today's: the q/k/v and GDN z projections (and their optimizer moments) were
        `[D, N, H]` until 2026-11-27 and are `[D, N·H]` now. Such a leaf is read in its stored
        shape, sharded as today's on its leading dims (then `_reshaped`); any other difference
        is an error naming the leaf (orbax's names only the shapes)."""
        metadata = self.manager.item_metadata(step)["state"]
        flat = jax.tree_util.tree_flatten_with_path(metadata, is_leaf=lambda x: hasattr(x, "shape"))
        stored = {_names(path): tuple(leaf.shape) for path, leaf in flat[0]}

        def as_stored(path, leaf):
            shape, name = stored.get(_names(path)), jax.tree_util.keystr(path)
            if shape is None:
                raise ValueError(f"checkpoint step {step} in {self.directory} has no {name}")
            if shape == leaf.shape or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                return leaf  # (orbax stores a key's data: its shape is not the key's)
            n = len(leaf.shape)  # the stored leaf splits today's last dim, the others equal:
            same_lead = n and shape[: n - 1] == leaf.shape[:-1]
            if not (same_lead and math.prod(shape[n - 1 :]) == leaf.shape[-1]):
                raise ValueError(
                    f"checkpoint step {step} in {self.directory}: {name} is {shape}, this "
                    f"run's is {leaf.shape} (a different model or configuration?)"
                )
            sharding = leaf.sharding
            if isinstance(sharding, jax.sharding.NamedSharding):
                spec = (*sharding.spec, *(None,) * (len(shape) - len(sharding.spec)))
                sharding = jax.sharding.NamedSharding(
                    sharding.mesh, jax.sharding.PartitionSpec(*spec)
                )
            return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)

        return jax.tree_util.tree_map_with_path(as_stored, abstract_state)

    def wait(self) -> None:
        """Block until any async save has been committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _reshaped(x: jax.Array, want: jax.ShapeDtypeStruct) -> jax.Array:
    if x.shape == want.shape:
        return x
    return jax.jit(lambda a: a.reshape(want.shape), out_shardings=want.sharding)(x)


def _names(path) -> tuple[str, ...]:
    """A key path as plain names: orbax's metadata tree has dicts where the state has
    attributes and sequences."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


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
