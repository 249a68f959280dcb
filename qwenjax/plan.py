"""`qwenjax plan`: compile the real train step for a TPU topology here, and say whether it fits.

Uses jax[tpu]'s libtpu to build a TPU topology on any machine (no TPU needed), lowers and
compiles the jitted train step of a run config for it, and reports per-chip memory (parameters,
optimizer state, activations/temporaries, total vs HBM), FLOPs per step and the compiler's cost
estimate. Exit status 1 when the config does not fit.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from qwenjax import sharding
from qwenjax.api import build
from qwenjax.config import ModelConfig
from qwenjax.train.loop import RunConfig
from qwenjax.train.step import (
    TrainState,
    jit_train_step,
    make_train_step,
    new_train_state_parts,
    split_model,
    train_state_shardings,
)

GiB = 2**30
# libtpu: "... the total memory required for HLO temporaries (523.79G) exceeds available HBM"
_HBM_EXHAUSTED = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory.*?temporaries \(([0-9.]+)G\)")


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    peak_flops: float  # bf16 dense, per chip
    cores_per_chip: int  # the "-N" of a slice name counts TensorCores on v4/v5p, chips elsewhere
    topologies: dict[int, str]  # chips → topology string for get_topology_desc


CHIPS = {
    "v5p": Chip(95 * GiB, 459e12, 2, {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4",
                                      64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}),
    "v6e": Chip(32 * GiB, 918e12, 1, {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8",
                                      64: "8x8", 128: "8x16", 256: "16x16"}),
    "v5e": Chip(16 * GiB, 197e12, 1, {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8",
                                      64: "8x8", 128: "8x16", 256: "16x16"}),
}  # fmt: skip


def topology(name: str) -> tuple[Chip, str]:
    """`v5p-64` (slice name) or `v5p:2x4x4` → (chip facts, get_topology_desc string)."""
    kind, sep, size = name.replace(":", "-", 1).partition("-")
    if kind not in CHIPS or not sep:
        raise ValueError(f"unknown TPU topology {name!r}; e.g. v5p-64, v6e-16, v5p:2x2x2")
    chip = CHIPS[kind]
    if "x" in size:
        return chip, f"{kind}:{size}"
    chips = int(size) // chip.cores_per_chip
    if chips not in chip.topologies:
        raise ValueError(f"{name}: known {kind} sizes are {sorted(chip.topologies)} chips")
    return chip, f"{kind}:{chip.topologies[chips]}"


def temporaries_refused(message: str) -> int | None:
    """Bytes of temporaries in libtpu's out-of-HBM compile error, or None for other errors."""
    found = _HBM_EXHAUSTED.search(message)
    return None if found is None else int(float(found.group(1)) * GiB)


def _bytes_per_device(tree: Any) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        # `dtype.itemsize`, not `jnp.dtype(...)`: the state holds PRNG keys (key<fry>, 8 bytes),
        # which are not NumPy dtypes.
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def plan(cfg: RunConfig, topology_name: str, *, model_config: ModelConfig | None = None) -> dict:
    """Compile `cfg`'s train step for `topology_name`; returns the report (bytes per chip)."""
    from jax.experimental import topologies  # needs jax[tpu] (libtpu)

    cfg.kernels.check_platform("tpu")
    chip, topo = topology(topology_name)
    devices = topologies.get_topology_desc(topo, platform="tpu").devices
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.RULES[cfg.model.rules]
    if model_config is None:
        if cfg.model.preset is None:
            model_config = ModelConfig.from_hf(cfg.model.checkpoint)
        else:
            model_config = ModelConfig.from_preset(cfg.model.preset)
    model = build(
        model_config,
        dtype=jnp.dtype(cfg.model.dtype),
        param_dtype=jnp.float32 if not cfg.model.lora_rank else jnp.dtype(cfg.model.dtype),
        abstract=True,
        remat=cfg.model.remat,
        lora_rank=cfg.model.lora_rank,
        lora_alpha=cfg.model.lora_alpha,
    )
    shardings = train_state_shardings(model, cfg.optim, mesh, rules)
    _, params, frozen = split_model(model)
    fresh = jax.eval_shape(lambda p: new_train_state_parts(p, cfg.optim, 0), params)
    shapes = TrainState(frozen=frozen, **fresh)
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    hosts = len({d.process_index for d in devices})
    k = cfg.train.grad_accum
    global_batch = cfg.data.batch_size * sharding.data_shards(mesh, rules, process_index=0)[1]
    batch_sharding = sharding.batch_sharding(mesh, rules, microbatched=True)
    batch = {
        name: jax.ShapeDtypeStruct(
            (k, global_batch // k, cfg.data.seq_len), jnp.int32, sharding=batch_sharding
        )
        for name in ("input_ids", "segment_ids", "positions", "loss_mask")
    }
    sharding.check_batch(batch["input_ids"].shape, batch_sharding)
    step_fn = make_train_step(
        model, cfg.optim, mtp_weight=cfg.train.mtp_weight, ce_chunk=cfg.train.ce_chunk
    )
    started = time.perf_counter()
    with cfg.kernels.pinned():
        lowered = jit_train_step(step_fn, mesh, rules, shardings).jitted.lower(state, batch)
    try:
        memory = lowered.compile().memory_analysis()
        temporaries = memory.temp_size_in_bytes
        total = (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + temporaries
        )
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program whose temporaries alone exceed HBM; that is the
        # answer "does not fit", with its figure, not a crash.
        temporaries = temporaries_refused(str(e))
        if temporaries is None:
            raise
        total = temporaries + _bytes_per_device(state)
    compile_seconds = time.perf_counter() - started
    tokens = global_batch * cfg.data.seq_len
    # XLA's cost analysis counts a while-loop body once, so the scanned blocks would be counted
    # once instead of num_blocks times: FLOPs come from the model's own count instead.
    flops = model_config.flops_per_token(cfg.data.seq_len) * tokens
    report = {
        "topology": topo,
        "chips": len(devices),
        "hosts": hosts,
        "mesh": dict(mesh.shape),
        "hbm_per_chip": chip.hbm_bytes,
        "params_per_chip": _bytes_per_device(state.params) + _bytes_per_device(state.frozen),
        "optimizer_per_chip": _bytes_per_device(state.opt_state),
        "temporaries_per_chip": temporaries,
        "total_per_chip": total,
        "fits": total <= chip.hbm_bytes,
        "tokens_per_step": tokens,
        "flops_per_step": flops,
        "step_seconds_at_peak": flops / (chip.peak_flops * len(devices)),
        "compile_seconds": compile_seconds,
        "remat": cfg.model.remat,
        "grad_accum": k,
        "global_batch": global_batch,
        "host_batch": cfg.data.batch_size,
        "kernels": dataclasses.asdict(cfg.kernels),
    }
    return report


def hints(r: dict) -> list[str]:
    """What to change in the run config when the step does not fit, cheapest first."""
    out, remat = [], r["remat"]
    if remat in ("none", "dots", "offload"):
        out.append(f"model.remat=full (now {remat}): keeps only each block's input")
    gdn = r["kernels"]["gated_delta_rule"]
    if gdn in ("auto", "chunked"):
        out.append(
            f"kernels.gated_delta_rule=pallas_tpu (now {gdn}): the Pallas kernel's backward "
            "keeps the inputs and one state per chunk, not the pure-JAX path's chunk "
            "intermediates (not yet timed on a TPU)"
        )
    if remat != "layers":
        out.append(
            f"model.remat=layers (now {remat}): checkpoints each layer inside the block, "
            "one layer's intermediates live at a time for one more forward pass"
        )
    if r["grad_accum"] < r["host_batch"]:
        out.append(
            f"train.grad_accum up to data.batch_size {r['host_batch']}, a divisor of it (now "
            f"{r['grad_accum']}): fewer sequences per microbatch, the same step"
        )
    out.append(
        "a larger --topology: parameters and optimizer state shard over fsdp x sequence, and "
        "mesh.sequence splits every sequence's tokens"
    )
    return out


def print_report(r: dict, out=sys.stdout) -> None:
    gib = lambda b: f"{b / GiB:8.2f} GiB"
    where = f"{r['chips']} chips on {r['hosts']} hosts"
    print(f"topology {r['topology']}: {where}, mesh {r['mesh']}", file=out)
    kernels = r["kernels"]
    print(f"  kernels: gated delta rule {kernels['gated_delta_rule']}, "
          f"attention {kernels['attention']}", file=out)  # fmt: skip
    print(f"  parameters        {gib(r['params_per_chip'])} per chip", file=out)
    print(f"  optimizer state   {gib(r['optimizer_per_chip'])} per chip", file=out)
    print(f"  activations/temps {gib(r['temporaries_per_chip'])} per chip", file=out)
    print(f"  total             {gib(r['total_per_chip'])} of {gib(r['hbm_per_chip'])} HBM "
          f"→ {'fits' if r['fits'] else 'DOES NOT FIT'}", file=out)  # fmt: skip
    print(f"  {r['tokens_per_step']:,} tokens/step, {r['flops_per_step']:.3e} model FLOPs/step "
          f"(fwd + bwd, no remat recompute)", file=out)  # fmt: skip
    print(f"  ≥ {r['step_seconds_at_peak']:.2f} s/step at peak bf16 FLOP/s "
          f"(at 40% MFU: {r['step_seconds_at_peak'] / 0.4:.2f} s)", file=out)  # fmt: skip
    print(f"  compiled in {r['compile_seconds']:.0f} s", file=out)
    if not r["fits"]:
        print("to fit, try:", file=out)
        for hint in hints(r):
            print(f"  - {hint}", file=out)
