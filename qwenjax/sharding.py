"""Logical axis names, the device mesh, and the rules tables that map one onto the other.

Every parameter carries logical axis names (`out_sharding` metadata, e.g. `("embed", "mlp")`)
and activations are constrained with `constrain(x, names)`. A rules table maps each logical name
to mesh axes; this module is the only place the two meet, so a new parallelism strategy is a new
table, not a model change.

Mesh axes, outermost first (the innermost gets the fastest links):
  data      pure data parallelism (parameters replicated)
  fsdp      data parallelism with parameters and optimizer state sharded (ZeRO-3)
  sequence  context parallelism over the token axis
  tensor    Megatron-style tensor parallelism over heads / FFN width / vocab
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import mesh_utils
from jax.experimental.layout import Layout, with_layout_constraint
from jax.sharding import NamedSharding, PartitionSpec

# ---------------------------------------------------------------------- logical names: parameters
LAYERS = "layers"  # the scanned super-block axis
VOCAB = "vocab"
EMBED = "embed"  # model width D
MLP = "mlp"  # FFN width F
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
GDN_CHANNELS = "gdn_channels"  # flat q|k|v channels of the GDN input projection and conv
GDN_V_HEADS = "gdn_v_heads"
GDN_K_HEADS = "gdn_k_heads"  # q/k heads of the delta rule (activations only)
CONV_WIDTH = "conv_width"
LORA_RANK = "lora_rank"
# Variable metadata: per dim, the whole pieces a shard may hold (heads of a flattened [N·H] dim).
SHARD_UNITS = "shard_units"

# ---------------------------------------------------------------------- logical names: activations
BATCH = "batch"
LENGTH = "length"
CACHE_LENGTH = "cache_length"  # slots of a KV cache
ACT_EMBED = "act_embed"  # D of activations (parameters' D is EMBED, sharded differently)
HIDDEN = (BATCH, LENGTH, ACT_EMBED)  # the residual stream [B, T, D]

# ---------------------------------------------------------------------- mesh axes
DATA = "data"
FSDP = "fsdp"
SEQUENCE = "sequence"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, SEQUENCE, TENSOR)

Rules = Mapping[str, str | tuple[str, ...] | None]

# ZeRO-3: each weight matrix is split along D over `fsdp` and all-gathered per layer; the batch
# is split over every data-like axis. Tensor-parallel names stay unsharded. The `sequence` axis
# shards parameters too: its devices hold the same weights (they split tokens, not weights), so
# at 262K tokens a v5p-64 of 32 sequence shards keeps 1/32 of the 27B's state per chip, not all.
FSDP_RULES: Rules = {
    BATCH: (DATA, FSDP),
    LENGTH: SEQUENCE,
    ACT_EMBED: None,
    LAYERS: None,
    VOCAB: None,
    EMBED: (FSDP, SEQUENCE),
    MLP: None,
    Q_HEADS: None,
    KV_HEADS: None,
    HEAD_DIM: None,
    GDN_CHANNELS: None,
    GDN_V_HEADS: None,
    GDN_K_HEADS: None,
    CONV_WIDTH: None,
    LORA_RANK: None,
    CACHE_LENGTH: None,
}
# FSDP over D plus tensor parallelism over heads, FFN width and vocab (Megatron column/row split).
FSDP_TP_RULES: Rules = {
    **FSDP_RULES,
    VOCAB: TENSOR,
    MLP: TENSOR,
    Q_HEADS: TENSOR,
    KV_HEADS: TENSOR,
    GDN_CHANNELS: TENSOR,
    GDN_V_HEADS: TENSOR,
    GDN_K_HEADS: TENSOR,
}
RULES: dict[str, Rules] = {"fsdp": FSDP_RULES, "fsdp_tp": FSDP_TP_RULES}


# ---------------------------------------------------------------------- mesh
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take all remaining devices."""

    data: int = 1
    fsdp: int = -1
    sequence: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> dict[str, int]:
        """Axis sizes `{name: size}` for `num_devices`, with the -1 axis filled in."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        free = [axis for axis, size in sizes.items() if size == -1]
        if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
            raise ValueError(f"mesh sizes must be positive with at most one -1, got {sizes}")
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(f"mesh {sizes} does not divide {num_devices} devices")
            sizes[free[0]] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            need = math.prod(sizes.values())
            raise ValueError(f"mesh {sizes} needs {need} devices, have {num_devices}")
        return sizes


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default all) with axes `MESH_AXES`, ordered for the topology."""
    devices = jax.devices() if devices is None else list(devices)
    shape = tuple(config.shape(len(devices)).values())
    grid = mesh_utils.create_device_mesh(shape, devices)
    # Auto axes: sharding follows GSPMD propagation from the constraints we place.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


# ---------------------------------------------------------------------- logical → mesh
def _axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """A rule's or a PartitionSpec entry's mesh axes as a tuple (None → ())."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """The `PartitionSpec` of an array whose dims carry logical `names` (None = replicated)."""
    out, used = [], set()
    for name in names:
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule (known: {sorted(rules)})")
        axes = _axes(rules.get(name) if name is not None else None)
        if used & set(axes):
            raise ValueError(f"mesh axes {sorted(used & set(axes))} used twice in {tuple(names)}")
        used |= set(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _check_divisible(
    shape: Sequence[int], pspec: PartitionSpec, mesh: Any, names: Sequence[Any], where: str
) -> list[str]:
    problems = []
    for dim, name, entry in zip(shape, names, pspec, strict=False):
        axes = _axes(entry)
        size = math.prod(mesh.shape[a] for a in axes)
        if dim % size:
            parts = "×".join(f"{a}={mesh.shape[a]}" for a in axes if mesh.shape[a] > 1)
            problems.append(f"{where}: {name}={dim} not divisible by {parts}")
    return problems


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


AnyMesh = jax.sharding.Mesh | jax.sharding.AbstractMesh


def tree_shardings(tree: Any, mesh: AnyMesh, rules: Rules) -> Any:
    """NamedShardings for a pytree holding `nnx.Variable`s (params, grads, optimizer moments).

    Variables are placed by their `out_sharding` logical names; any other leaf (step counters,
    scalars) is replicated. Raises one `ValueError` listing every dimension that a mesh axis
    does not divide.
    """
    problems: list[str] = []

    def one(path, leaf):
        if not _is_variable(leaf):
            return NamedSharding(mesh, PartitionSpec())
        names = leaf.get_metadata().get("out_sharding") or (None,) * leaf.ndim
        pspec = spec(names, rules)
        where = jax.tree_util.keystr(path)
        # Units name the trailing dims: a scan stacks its layers' variables on a new leading axis.
        units = leaf.get_metadata().get(SHARD_UNITS) or ()
        units = (None,) * (leaf.ndim - len(units)) + tuple(units)
        dims = [dim if unit is None else unit for dim, unit in zip(leaf.shape, units, strict=True)]
        problems.extend(_check_divisible(dims, pspec, mesh, names, where))
        return leaf.replace(value=NamedSharding(mesh, pspec))

    out = jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_variable)
    if problems:
        raise ValueError("mesh does not divide the model:\n  " + "\n  ".join(problems))
    return out


def param_shardings(model_or_state: Any, mesh: AnyMesh, rules: Rules) -> nnx.State:
    """Shardings of every variable of a (possibly abstract) model or `nnx.State`, by the rules."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return tree_shardings(state, mesh, rules)


# ---------------------------------------------------------------------- activations
_ACTIVE: contextvars.ContextVar[tuple[jax.sharding.Mesh, Rules] | None] = contextvars.ContextVar(
    "qwenjax_sharding_rules", default=None
)


@contextlib.contextmanager
def use_rules(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
    """Within this block (while tracing), `constrain` places activations on `mesh` by `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def row_major(x: jax.Array, names: Sequence[str | None] | None = None) -> jax.Array:
    """`x` pinned to the row-major layout, where XLA would otherwise pick one that costs a
    copy. Under a multi-device mesh the partitioner does not know the layout custom call and
    gathers its operand whole onto every device (the 27B's KV stacks, every decode step, on a
    v5p tensor-parallel mesh), so there each device pins its own shard inside `shard_map`,
    split by `x`'s logical `names`; without names it is the identity there."""
    active = _ACTIVE.get()
    pin = lambda y: with_layout_constraint(y, Layout(tuple(range(y.ndim))))
    if active is None or active[0].size == 1:
        return pin(x)
    return x if names is None else shard_kernel(pin, [x], [names], tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; the identity outside `use_rules` (single device)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(names, rules)))


def _is_names(x: Any) -> bool:
    """A logical-names tuple holds str/None; a tuple of such tuples is several outputs."""
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def shard_kernel(
    fn: Callable[..., Any], args: Sequence[jax.Array], in_names: Sequence, out_names: Any
) -> Any:
    """`fn(*args)` run per shard under `jax.shard_map`, each array split by its logical names.

    Kernels (Pallas/Mosaic above all) cannot be partitioned by XLA, so under active rules each
    device runs `fn` on its own rows and heads; the names must keep every dimension that `fn`
    mixes (time, head dim) whole. Outside `use_rules` this is just `fn(*args)`.
    """
    active = _ACTIVE.get()
    if active is None:
        return fn(*args)
    mesh, rules = active
    in_specs = tuple(spec(n, rules) for n in in_names)
    out_specs = jax.tree.map(lambda n: spec(n, rules), out_names, is_leaf=_is_names)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        *args
    )


@contextlib.contextmanager
def one_row() -> Iterator[None]:
    """Within this block the active rules leave the batch whole: a single request's work (one
    row cannot be divided over the data axes; its heads still are)."""
    active = _ACTIVE.get()
    if active is None:
        yield
        return
    mesh, rules = active
    with use_rules(mesh, {**rules, BATCH: None}):
        yield


def _row_split(names: Sequence[str | None], axis: int) -> tuple[str, ...]:
    """The mesh axes the active rules split dimension `axis` over (none: not split)."""
    active = _ACTIVE.get()
    if active is None:
        return ()
    mesh, rules = active
    axes = _axes(rules.get(names[axis]))
    return axes if math.prod(mesh.shape[a] for a in axes) > 1 else ()


def _held_here(split: tuple[str, ...], index: jax.Array, per: int) -> tuple[jax.Array, jax.Array]:
    """Inside `shard_map`: whether this device's `per` rows hold row `index`, and where."""
    return jax.lax.axis_index(split) == index // per, index % per


def take_row(x: jax.Array, index: jax.Array, names: Sequence[str | None], axis: int) -> jax.Array:
    """`x`'s entry `index` along `axis` (kept, size 1), `x` split by its logical `names`.

    Where that axis is split over devices, XLA partitions a dynamic slice of it by gathering the
    whole of `x` onto every device (a serving cache, at every prefill chunk); here the device
    holding the entry slices it from its shard and the others add zeros: one row moves.
    """
    split = _row_split(names, axis)
    if not split:
        return jax.lax.dynamic_slice_in_dim(x, index, 1, axis)
    row_names = tuple(None if i == axis else n for i, n in enumerate(names))

    def local(x, index):
        mine, at = _held_here(split, index, x.shape[axis])
        row = jax.lax.dynamic_slice_in_dim(x, at, 1, axis)
        return jax.lax.psum(jnp.where(mine, row, jnp.zeros_like(row)), split)

    return shard_kernel(local, [x, index], [tuple(names), ()], row_names)


def put_row(
    x: jax.Array, row: jax.Array, index: jax.Array, names: Sequence[str | None], axis: int
) -> jax.Array:
    """`x` with its entry `index` along `axis` set to `row` (size 1 there), `x` split by its
    logical `names`: written in place by the device that holds it (see `take_row`)."""
    row = row.astype(x.dtype)
    split = _row_split(names, axis)
    if not split:
        return jax.lax.dynamic_update_slice_in_dim(x, row, index, axis)
    row_names = tuple(None if i == axis else n for i, n in enumerate(names))

    def local(x, row, index):
        mine, at = _held_here(split, index, x.shape[axis])
        old = jax.lax.dynamic_slice_in_dim(x, at, 1, axis)
        return jax.lax.dynamic_update_slice_in_dim(x, jnp.where(mine, row, old), at, axis)

    return shard_kernel(local, [x, row, index], [tuple(names), row_names, ()], tuple(names))


def context_axes() -> str | tuple[str, ...] | None:
    """The mesh axes the active rules split the token axis (LENGTH) over, or None when every
    device holds whole sequences (no active rules, or those axes have size 1).

    Sequence mixers use it to pick their context-parallel kernels, which take the time axis
    split over these axes instead of all-gathering it.
    """
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    axes = _axes(rules.get(LENGTH))
    if math.prod(mesh.shape[a] for a in axes) == 1:
        return None
    return axes[0] if len(axes) == 1 else axes


def active_shards(name: str) -> int:
    """Into how many shards the active rules split logical axis `name` (1 outside `use_rules`)."""
    active = _ACTIVE.get()
    if active is None:
        return 1
    mesh, rules = active
    return math.prod(mesh.shape[a] for a in _axes(rules.get(name)))


def constrain_tree(tree: Any) -> Any:
    """`constrain` for a pytree of `nnx.Variable`s (e.g. a gradient accumulator) by metadata."""
    active = _ACTIVE.get()
    if active is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, *active))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules, *, microbatched: bool) -> NamedSharding:
    """Sharding of `[B, T]` batch arrays, or `[k, B/k, T]` when `microbatched`."""
    names = (None, BATCH, LENGTH) if microbatched else (BATCH, LENGTH)
    return NamedSharding(mesh, spec(names, rules))


def batch_split(mesh: jax.sharding.Mesh | None, rules: Rules | None) -> int:
    """Into how many shards `rules` split the batch axis on `mesh` (1 without a mesh): batch
    sizes must be a multiple of it."""
    if mesh is None:
        return 1
    axes = _axes(spec((BATCH,), rules)[0])
    return math.prod(mesh.shape[a] for a in axes)


def data_shards(
    mesh: jax.sharding.Mesh, rules: Rules, process_index: int | None = None
) -> tuple[int, int]:
    """(this process's data shard, number of data shards) for the batch layout of `rules`.

    Each process feeds the batch rows its devices hold. Processes whose devices hold the same
    rows (they split those rows' tokens over a sequence axis, or replicate them over a tensor
    axis) must read the same records; the others disjoint ones. So records are split this
    many ways, not one way per process: with the token axis over every chip, as at 262K
    context, all hosts read the same rows and there is one shard.

    A process's shards need not be neighbours (`make_mesh` orders devices for the chips'
    links, which interleaves hosts): `jax.make_array_from_process_local_data` maps its rows to
    them in order.

    Raises:
      ValueError: when two processes hold some but not all of the same batch shards (no
        per-process data pipeline can feed such a layout).
    """
    n = batch_split(mesh, rules)
    rows = NamedSharding(mesh, PartitionSpec(spec((BATCH,), rules)[0]))
    held: dict[int, set[int]] = {}
    for device, index in rows.devices_indices_map((n,)).items():
        held.setdefault(device.process_index, set()).update(range(*index[0].indices(n)))
    groups = sorted({frozenset(r) for r in held.values()}, key=min)
    if sum(len(g) for g in groups) != n or len({len(g) for g in groups}) != 1:
        layout = {p: sorted(r) for p, r in sorted(held.items())}
        raise ValueError(
            f"the mesh {dict(mesh.shape)} gives processes partly shared batch shards "
            f"(process: shards {layout}); order its devices so that processes holding any "
            "of the same batch rows hold all of the same rows"
        )
    p = jax.process_index() if process_index is None else process_index
    return groups.index(frozenset(held[p])), len(groups)


def check_batch(shape: Sequence[int], sharding: NamedSharding) -> None:
    """Raise a clear error when the mesh does not divide a batch array of `shape`."""
    names = ("microbatches", "batch", "length")[-len(shape) :]
    problems = _check_divisible(shape, sharding.spec, sharding.mesh, names, "batch")
    if problems:
        raise ValueError("mesh does not divide the batch:\n  " + "\n  ".join(problems))
