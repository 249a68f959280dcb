"""Build a model from a config (random, shape-only, or directly sharded over a mesh)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax import sharding
from qwenjax.config import ModelConfig
from qwenjax.model import Qwen35
from qwenjax.model.params import LoRAConfig
from qwenjax.vision.model import Qwen35VL


def build(
    config: ModelConfig,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype | None = None,
    abstract: bool = False,
    seed: int = 0,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    remat: str = "none",
    vision: bool = False,
) -> Qwen35:
    """A model with HF-style random init; `abstract=True` gives shapes only (no memory).

    Args:
      config: the model configuration.
      dtype: compute dtype (activations and matmuls).
      param_dtype: parameter dtype, default `dtype` (use fp32 master weights with bf16 compute).
      abstract: return a model whose parameters are `jax.ShapeDtypeStruct`s.
      seed: PRNG seed for the initialisation.
      lora_rank: > 0 adds LoRA adapters (`nnx.LoRAParam`) of this rank to every projection
        matrix; training then updates only the adapters.
      lora_alpha: LoRA scale numerator (update = x A B · alpha / rank), default `lora_rank`.
      remat: what the backward pass keeps of each scanned block, a key of `REMAT_POLICIES`
        ("none", "full", "dots", "offload", "layers").
      vision: build `Qwen35VL`, the text model plus the vision tower of `config.vision` (its
        text parameters get the same init as without).
    """
    lora_config = None
    if lora_rank:
        lora_config = LoRAConfig(lora_rank, float(lora_rank if lora_alpha is None else lora_alpha))
    make = lambda: (Qwen35VL if vision else Qwen35)(
        config,
        dtype=dtype,
        param_dtype=param_dtype,
        lora_config=lora_config,
        remat=remat,
        # Adapters draw from their own stream, so the base equals the LoRA-free model's init.
        rngs=nnx.Rngs(seed, lora=jax.random.fold_in(jax.random.key(seed), 1)),
    )
    return nnx.eval_shape(make) if abstract else make()


def add_lora(model: Qwen35, *, rank: int, alpha: float | None = None, seed: int = 0) -> Qwen35:
    """`model` (e.g. a loaded checkpoint) with fresh LoRA adapters on its projections.

    The base parameters are shared with `model`, not copied; only the adapters are created
    (on the default device; place them with `train.step.init_train_state`).
    """
    kwargs = dict(
        dtype=model.dtype,
        param_dtype=model.embed_tokens.dtype,
        lora_rank=rank,
        lora_alpha=alpha,
        remat=model.remat,
        seed=seed,
        vision=hasattr(model, "visual"),
    )
    graphdef, _ = nnx.split(build(model.config, abstract=True, **kwargs))
    # Only the adapters are outputs, so XLA never materialises the throwaway base init.
    adapters = jax.jit(lambda: nnx.state(build(model.config, **kwargs), nnx.LoRAParam))()
    return nnx.merge(graphdef, nnx.state(model), adapters)


def build_sharded(
    config: ModelConfig, mesh: jax.sharding.Mesh, rules: sharding.Rules, **build_kwargs
) -> Qwen35:
    """`build(config, **build_kwargs)` with every parameter created in place on `mesh`.

    The initialiser runs under `jit` with the rules' output shardings, so no device ever holds
    an unsharded parameter. JAX's random bits do not depend on the sharding: the values equal a
    jitted unsharded init (an eager `build` may differ in the last bit of the normal samples).
    """
    graphdef, abstract = nnx.split(build(config, abstract=True, **build_kwargs))
    shardings = sharding.param_shardings(abstract, mesh, rules)
    init = jax.jit(lambda: nnx.state(build(config, **build_kwargs)), out_shardings=shardings)
    return nnx.merge(graphdef, init())


def merge_lora(model: Qwen35) -> Qwen35:
    """A LoRA-free model whose projections include their adapters: `W + A B · alpha / rank`.

    For export and serving after LoRA training; the result has the plain model's structure (and
    parameter dtype: the update is added in fp32, then cast to W's dtype).
    """
    plain = build(
        model.config,
        abstract=True,
        dtype=model.dtype,
        param_dtype=model.embed_tokens.dtype,
        remat=model.remat,
        vision=hasattr(model, "visual"),
    )
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    merged = []
    for path, variable in nnx.to_flat_state(nnx.state(plain)):
        weight = flat[path].get_value()
        adapter_path = (*path[:-1], f"{path[-1]}_lora")
        if (*adapter_path, "a") in flat:
            adapter = functools.reduce(_child, adapter_path, model)
            a, b = (flat[(*adapter_path, name)].get_value() for name in ("a", "b"))
            stacked = flat[path].get_metadata()["out_sharding"][0] == sharding.LAYERS
            delta = (jax.vmap(_lora_delta) if stacked else _lora_delta)(a, b) * adapter.scale
            weight = (weight.astype(jnp.float32) + delta).astype(weight.dtype)
        merged.append((path, variable.replace(value=weight)))
    return nnx.merge(nnx.graphdef(plain), nnx.from_flat_state(merged))


def _lora_delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a [in..., r] · b [r, out...]` → `[in..., out...]`, the shape of the adapted weight."""
    return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def _child(module, key):
    return module[key] if isinstance(key, int) else getattr(module, key)


def param_count(model: Qwen35, *, include_mtp: bool = True) -> int:
    """Number of parameters in a (possibly abstract) model."""
    state = nnx.state(model, nnx.Param)
    total = 0
    for path, leaf in nnx.to_flat_state(state):
        if include_mtp or path[0] != "mtp":
            total += leaf.get_value().size if hasattr(leaf, "get_value") else leaf.value.size
    return total
