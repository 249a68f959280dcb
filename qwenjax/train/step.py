"""The training step: gradient accumulation, AdamW update, metrics; jitted with shardings.

    for each micro-batch j (lax.scan):  g += ∇ (Σ_j CE / N_main + λ Σ_j MTP / N_mtp)
    params, opt_state = AdamW(clip(g))

N_main, N_mtp are the counted targets of the whole step's batch, known from the batch before
any forward pass, so the accumulated loss and gradient equal one big batch's exactly (up to
float summation order), not a mean of per-micro-batch means.

Precision: the trainable parameters are fp32 master weights (so are the Adam moments); the
model's compute dtype (e.g. bf16, fixed by `build(dtype=...)`) applies inside the forward pass,
where each layer casts its weights on use. With LoRA only the `nnx.LoRAParam` adapters train:
the base stays in `TrainState.frozen`, sharded as it was, and gets no gradient. A vision
tower (`Qwen35VL`) is frozen too unless `train_vision=True`: by default only the language model
trains.

Image batches (see `train.data`) add `positions [k, 3, B/k, T]` (mRoPE) and the pixel arrays and
grids of `VISION_KEYS` with a leading micro-batch axis of 1 (they are not split into
micro-batches) and replicated over the mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwenjax import sharding
from qwenjax.model import Qwen35
from qwenjax.train.loss import VISION_KEYS, Batch, loss_fn, target_counts
from qwenjax.train.optim import OptimConfig, learning_rate, make_optimizer

Metrics = dict[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step reads and writes (a pytree; save it to resume).

    step: int32 number of updates done. params: trainable parameters (fp32). frozen: the rest of
    the model's variables (the base under LoRA; empty otherwise). opt_state: optax state (its
    moments are `nnx.Variable`s shaped and sharded like `params`). rng: PRNG key for stochastic
    training features (carried unchanged; nothing in the step is stochastic yet).
    """

    step: jax.Array
    params: nnx.State
    frozen: nnx.State
    opt_state: optax.OptState
    rng: jax.Array


def split_model(
    model: Qwen35, *, train_vision: bool = False
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`(graphdef, trainable, frozen)`: LoRA adapters if the model has any, else all parameters
    but the vision tower's (with `train_vision`, all parameters)."""
    has_lora = bool(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    text = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("visual")))
    return nnx.split(model, nnx.LoRAParam if has_lora else nnx.Param if train_vision else text, ...)


def make_grad_fn(
    model: Qwen35, *, mtp_weight: float = 0.1, ce_chunk: int = 512, train_vision: bool = False
) -> Callable[[nnx.State, nnx.State, Batch], tuple[nnx.State, Metrics]]:
    """`grads(params, frozen, batch) → (grads, metrics)` accumulated over `[k, B/k, T]` batches.

    Args:
      model: the model (possibly abstract); only its structure, compute dtype and remat policy
        are used, the values come from `params` and `frozen` (as split by `split_model`).
      mtp_weight: λ of the MTP loss (0 skips the MTP head).
      ce_chunk: logits tile of the fused LM-head cross-entropy: about `ce_chunk · V` fp32
        logits per device at once (`kernels.cross_entropy.token_nll`).
      train_vision: train the vision tower too (`split_model`).

    Gradients are of the whole batch's objective (normalised by its total target counts) and
    fp32 like the master weights. Metrics are those of `train.loss.loss_fn`, for the whole batch.
    """
    graphdef, _, _ = split_model(model, train_vision=train_vision)

    def micro_loss(params, frozen, micro, counts):
        model = nnx.merge(graphdef, params, frozen)
        return loss_fn(model, micro, mtp_weight=mtp_weight, ce_chunk=ce_chunk, counts=counts)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def grads(params: nnx.State, frozen: nnx.State, batch: Batch) -> tuple[nnx.State, Metrics]:
        counts = target_counts(batch)  # over all micro-batches

        def accumulate(total, micro):
            (_, metrics), g = grad_fn(params, frozen, micro, counts)
            return jax.tree.map(jnp.add, total, g), metrics

        zeros = sharding.constrain_tree(jax.tree.map(jnp.zeros_like, params))
        total, metrics = jax.lax.scan(accumulate, zeros, batch)
        return total, jax.tree.map(lambda x: x.sum(0), metrics)  # terms are already / totals

    return grads


def make_train_step(
    model: Qwen35,
    optim: OptimConfig,
    *,
    mtp_weight: float = 0.1,
    ce_chunk: int = 512,
    train_vision: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """A pure `step(state, batch) → (state, metrics)`; jit it with `jit_train_step`.

    Args:
      model: the model (possibly abstract); only its structure, compute dtype and remat policy
        are used, the values come from the state.
      optim: optimizer configuration.
      mtp_weight: λ of the MTP loss (0 skips the MTP head).
      ce_chunk: logits tile of the fused LM-head cross-entropy: about `ce_chunk · V` fp32
        logits per device at once (`kernels.cross_entropy.token_nll`).
      train_vision: train the vision tower too (pass the same to `init_train_state`).

    The batch holds `[k, B/k, T]` arrays (k micro-batches, see `microbatches`). Metrics: `loss`
    (the objective), `ce_loss`, `mtp_loss`, `tokens` and `mtp_tokens` (counted targets),
    `grad_norm` (before clipping) and `lr` (of this update).
    """
    grad_fn = make_grad_fn(
        model, mtp_weight=mtp_weight, ce_chunk=ce_chunk, train_vision=train_vision
    )
    optimizer, schedule = make_optimizer(optim), learning_rate(optim)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        grads, metrics = grad_fn(state.params, state.frozen, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics |= dict(grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        new_state = dataclasses.replace(
            state, step=state.step + 1, params=params, opt_state=opt_state
        )
        return new_state, metrics

    return step


def microbatches(batch: dict, k: int) -> dict:
    """`[B, T]` host arrays → `[k, B/k, T]` (micro-batch j = rows j·B/k … (j+1)·B/k − 1);
    mRoPE positions `[3, B, T]` → `[k, 3, B/k, T]`; pixel arrays and grids → `[1, ...]`, which
    allows only k = 1 (pixels are not split between micro-batches)."""
    b = batch["input_ids"].shape[0]
    if b % k:
        raise ValueError(f"batch size {b} is not divisible by {k} micro-batches")
    if k > 1 and any(name in batch for name in VISION_KEYS):
        raise ValueError(f"image/video batches need grad_accum 1, got {k} micro-batches")
    out = {}
    for name, x in batch.items():
        if name in VISION_KEYS:
            out[name] = x[None]
        elif x.ndim == 3:  # mRoPE positions [3, B, T]
            out[name] = x.reshape(3, k, b // k, x.shape[-1]).swapaxes(0, 1)
        else:
            out[name] = x.reshape(k, b // k, *x.shape[1:])
    return out


def new_train_state_parts(params: nnx.State, optim: OptimConfig, seed: jax.Array) -> dict:
    """The parts of a new train state that are created, not just placed."""
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)  # fp32 master weights
    return dict(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=make_optimizer(optim).init(params),
        rng=jax.random.key(seed),
    )


def train_state_shardings(
    model: Qwen35,
    optim: OptimConfig,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
    *,
    train_vision: bool = False,
) -> TrainState:
    """The `NamedSharding` of every leaf of the train state (parameters and moments by rules)."""
    _, params, frozen = split_model(model, train_vision=train_vision)
    fresh = jax.eval_shape(lambda p: new_train_state_parts(p, optim, 0), params)
    return sharding.tree_shardings(TrainState(frozen=frozen, **fresh), mesh, rules)


def init_train_state(
    model: Qwen35,
    optim: OptimConfig,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
    *,
    seed: int = 0,
    train_vision: bool = False,
) -> tuple[TrainState, TrainState]:
    """A sharded train state for `model`, and its shardings (for `jit_train_step`).

    Parameters are placed by the rules (a no-op when already there, e.g. from
    `api.build_sharded` or a sharded load); the fp32 master copy and the optimizer state come
    out of a jitted function with sharded outputs, so no device holds an unsharded copy.
    `train_vision` makes the vision tower trainable (as for `make_train_step`). The frozen part
    shares `model`'s buffers, which the step donates: do not use `model` afterwards.
    """
    shardings = train_state_shardings(model, optim, mesh, rules, train_vision=train_vision)
    _, params, frozen = split_model(model, train_vision=train_vision)
    params, frozen = jax.device_put((params, frozen), (shardings.params, shardings.frozen))
    fresh_shardings = {k: getattr(shardings, k) for k in ("step", "params", "opt_state", "rng")}
    fresh = jax.jit(new_train_state_parts, static_argnums=1, out_shardings=fresh_shardings)(
        params, optim, seed
    )
    return TrainState(frozen=frozen, **fresh), shardings


def batch_shardings(
    mesh: jax.sharding.Mesh, rules: sharding.Rules, batch: Batch
) -> dict[str, NamedSharding]:
    """Per array of a `[k, B/k, T]` batch: tokens by the batch rules, mRoPE positions
    `[k, 3, B/k, T]` likewise on B and T, pixel arrays and grids replicated."""
    tokens = sharding.batch_sharding(mesh, rules, microbatched=True)
    positions = NamedSharding(mesh, PartitionSpec(None, None, *tokens.spec[1:]))
    replicated = NamedSharding(mesh, PartitionSpec())
    return {
        name: replicated if name in VISION_KEYS else positions if x.ndim == 4 else tokens
        for name, x in batch.items()
    }


def jit_train_step(
    step_fn: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
    state_shardings: TrainState,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`step_fn` jitted over `mesh`: explicit in/out shardings, the input state donated.

    Activations inside are placed by `rules` (`sharding.constrain`). Batches are `[k, B/k, T]`
    host or device arrays; a batch the mesh does not divide is rejected with a clear error.
    Image batches (more keys, see `batch_shardings`) get a jitted function of their own.
    """
    batch_sharding = sharding.batch_sharding(mesh, rules, microbatched=True)

    def run(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with sharding.use_rules(mesh, rules):
            return step_fn(state, batch)

    jitted = jax.jit(
        run,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )

    by_layout = {}

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        if "positions" in batch and batch["positions"].ndim == 3:  # text only
            for x in batch.values():
                sharding.check_batch(x.shape, batch_sharding)
            return jitted(state, batch)
        sharding.check_batch(batch["input_ids"].shape, batch_sharding)
        layout = tuple(sorted((name, x.ndim) for name, x in batch.items()))
        if layout not in by_layout:
            by_layout[layout] = jax.jit(
                run,
                in_shardings=(state_shardings, batch_shardings(mesh, rules, batch)),
                out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
                donate_argnums=0,
            )
        return by_layout[layout](state, batch)

    train_step.jitted = jitted  # for ahead-of-time lowering (`qwenjax plan`)
    return train_step
