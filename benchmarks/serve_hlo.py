"""The serving scheduler's row functions compiled for a TPU topology from this CPU host: does a
prefill chunk, an admission (a copy between slots) or a snapshot gather the cache onto every
chip, or copy it instead of updating it in place?

    python -m benchmarks.serve_hlo --target v5p:2x2x1 --fsdp 4 --blocks 2 --slots 8

A script, not a test (`tests/serve/test_serve_hlo.py` runs it). The 27B geometry with `--blocks`
of its 16 super-blocks, bf16, `--slots` rows of `--max-length` tokens, split as `qwenjax serve
--mesh fsdp=F,tensor=T` splits them: slots over fsdp, heads over tensor. Prints per function the
temporaries per chip, every all-gather of a whole cache or snapshot leaf (every slot on one
chip), and the writes of at least `--min-mib` that are not in-place updates.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

import qwenjax
from benchmarks.common import utc_stamp
from benchmarks.decode_hlo import devices_for, large_writes
from qwenjax import sharding as ax
from qwenjax.inference.engine import StaticGraph, all_allowed
from qwenjax.model.cache import logical_axes
from qwenjax.serve import scheduler as sched

_HLO_DTYPE = {"float32": "f32", "bfloat16": "bf16", "int32": "s32"}


def whole_leaf_gathers(hlo: str, leaves, slots: int) -> list[str]:
    """The all-gathers in `hlo` whose result is one of `leaves` (`[NB, B, ...]` stacks, split
    by their shardings) with every one of the `slots` rows on a device."""
    whole = set()
    for x in leaves:
        shard = list(x.sharding.shard_shape(x.shape))
        shard[1] = slots
        dtype = jnp.dtype(x.dtype).name
        whole.add(f"{_HLO_DTYPE.get(dtype, dtype)}[{','.join(map(str, shard))}]")
    return [g for g in re.findall(r"= (\w+\[[\d,]*\])\S* all-gather", hlo) if g in whole]


def compile_serving(
    target: str,
    *,
    blocks: int,
    slots: int,
    max_length: int,
    chunk: int,
    fsdp: int,
    tensor: int = 1,
    min_mib: float = 16,
    functions: tuple[str, ...] = ("prefill_chunk", "admit_copy", "snapshot"),
) -> dict:
    devices = devices_for(target)
    if fsdp * tensor > len(devices):
        raise ValueError(f"fsdp {fsdp} x tensor {tensor}: {target} has {len(devices)} chips")
    config = qwenjax.ModelConfig.from_preset("qwen3.6-27b")
    layers = blocks * (config.num_hidden_layers // config.num_blocks)
    config = config.replace(num_hidden_layers=layers, layer_types=config.layer_types[:layers])
    mesh = ax.make_mesh(ax.MeshConfig(fsdp=fsdp, tensor=tensor), devices[: fsdp * tensor])
    rules = ax.RULES["fsdp_tp" if tensor > 1 else "fsdp"]
    place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    by_name = lambda x, names: place(x, NamedSharding(mesh, ax.spec(names, rules)))
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

    graphdef, params = nnx.split(qwenjax.build(config, dtype=jnp.bfloat16, abstract=True))
    params = jax.tree.map(place, params, ax.param_shardings(params, mesh, rules))
    opts = sched.serving_options(max_length, chunk, 0, 0)
    fresh = functools.partial(sched.fresh_state, config, slots, opts, jnp.bfloat16)
    with ax.use_rules(mesh, rules):  # the state as the scheduler places it
        shardings = jax.jit(fresh).lower().compile().output_shardings
    state = jax.tree.map(place, jax.eval_shape(fresh), shardings)
    allowed = all_allowed(slots, config.vocab_size)
    req = jax.eval_shape(lambda: sched.idle_requests(slots, config.vocab_size, allowed))
    req = jax.tree.map(lambda x: place(x, replicated), req)
    row_req = jax.eval_shape(lambda: sched.idle_requests(1, config.vocab_size, allowed[:1]))
    row_req = jax.tree.map(lambda x: place(x, replicated), row_req)
    gdn = sched._gdn_only(state.cache.blocks)
    snap = jax.tree.map(by_name, gdn, sched._gdn_only(logical_axes(state.cache).blocks))
    snaps = {"system": snap, "snapshot": snap}
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    ids = jax.ShapeDtypeStruct((1, chunk), jnp.int32, sharding=replicated)

    with ax.use_rules(mesh, rules):
        lowered = {
            "prefill_chunk": sched._prefill_chunk.lower(
                StaticGraph(graphdef), params, state, req, scalar, ids, scalar, ids, None,
                opts=opts, last=True,
            ),
            "admit_copy": sched._admit.lower(
                state, req, snaps, scalar, scalar, row_req, scalar, mode="copy", point="system"
            ),
            "snapshot": sched._snapshot.lower(snap, state, scalar),
        }  # fmt: skip
    leaves = jax.tree.leaves((state.cache.blocks, snap))
    nbytes = lambda tree: sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    report = {
        "target": target,
        "how": "compiled ahead of time on a CPU host (jax[tpu] topology); nothing ran on a chip",
        "jax": jax.__version__,
        "fsdp": fsdp,
        "tensor": tensor,
        "blocks": blocks,
        "slots": slots,
        "max_length": max_length,
        "chunk": chunk,
        "cache_mib_per_chip": nbytes(state.cache) / (fsdp * tensor) / 2**20,
    }
    for name in functions:
        compiled = lowered[name].compile()
        text = compiled.as_text()
        report[name] = {
            "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
            "cache_gathers": whole_leaf_gathers(text, leaves, slots),
            "copies": [w for w in large_writes(text, min_mib * 2**20) if not w["in_place"]],
        }
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="v5p:2x2x1", help="a TPU topology, h100 or local")
    p.add_argument("--fsdp", type=int, default=4, help="chips the slots are split over")
    p.add_argument("--tensor", type=int, default=1, help="chips the heads are split over")
    p.add_argument("--blocks", type=int, default=2, help="super-blocks of the 27B (16 in all)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk")
    p.add_argument("--min-mib", type=float, default=16, help="smallest copy listed")
    p.add_argument("--functions", default="prefill_chunk,admit_copy,snapshot")
    p.add_argument("--out", default=None, help="a directory for the report (.json)")
    args = p.parse_args(argv)
    report = compile_serving(
        args.target,
        blocks=args.blocks,
        slots=args.slots,
        max_length=args.max_length,
        chunk=args.chunk,
        fsdp=args.fsdp,
        tensor=args.tensor,
        min_mib=args.min_mib,
        functions=tuple(args.functions.split(",")),
    )
    text = json.dumps(report, indent=1)
    if args.out:
        name = f"{utc_stamp()}_{args.target.replace(':', '-')}_serve_hlo_fsdp{args.fsdp}.json"
        path = Path(args.out) / name
        path.write_text(text + "\n")
        print(f"wrote {path}")
    print(text)


if __name__ == "__main__":
    main()
