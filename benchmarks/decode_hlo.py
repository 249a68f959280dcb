"""What one compiled decode step moves: the large buffers XLA writes, for an H100 or a TPU, from
this CPU.

    python -m benchmarks.decode_hlo --target h100            # 27B geometry, 2 super-blocks
    python -m benchmarks.decode_hlo --target v5p:2x2x1 --kernels auto gdn=pallas_tpu
    python -m benchmarks.decode_hlo --target v5p:2x2x1 --tensor 4   # heads over 4 chips
    python -m benchmarks.decode_hlo --target v5p:2x2x1 --tokens 3 --verify   # the MTP step

A script, not a test, and not a timing: it compiles `model.extend` (one decode step, or a
verification of T - 1 drafts; with `--verify`, also the commit of the kept drafts after it, as
MTP speculative decoding runs them) for 32 rows with the cache donated, as the engine and the
serving scheduler run it, and lists every instruction of the compiled program (outside fusions'
bodies) whose result is at least `--min-mib`: copies of weights or caches, transposes, slices,
updates.
Each is a write of that many bytes (and usually a read as large), so beside the weights and the
rows' own cache entries, they are the step's avoidable memory traffic. Also reported: XLA's
temporaries, against the bytes of the whole cache.

`--blocks` keeps the compile short (each super-block is 3 Gated DeltaNet + 1 attention layer,
scanned: the body is compiled once, so what one block moves, all 16 move). Needs the CUDA plugin
for `--target h100` (`.cuda-plugin/<jax version>` on PYTHONPATH, as the tests install it) and
jax[tpu] for TPU targets. `--tensor N` compiles for N chips of a TPU topology with heads split
over them (the `fsdp_tp` rules: what each chip runs and writes). Results:
`{stamp}_{target}-compile-only_decode_hlo.*` under `--out`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import re
import types

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

import qwenjax
from benchmarks.common import utc_stamp, write_results
from qwenjax import sharding as ax
from qwenjax.inference import engine
from qwenjax.kernels.choice import kernel_flags
from qwenjax.model.cache import init_cache, logical_axes

_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
# `%name = TYPE op(`, TYPE an array `f32[2,3]{1,0}` or a tuple of them (multi-output fusions).
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w-]*)\((?=%|\))")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
# Not writes: views, the loop and its carried tuple, and TPU buffer allocations (custom calls;
# Pallas kernels write in place into their aliased inputs here).
_IN_PLACE = {"dynamic-update-slice", "scatter"}
_FREE = {"bitcast", "get-tuple-element", "parameter", "tuple", "constant", "custom-call", "while"}


def devices_for(target: str) -> list[jax.Device]:
    if target == "local":  # this machine's accelerators, with its own jax's compiler
        return jax.devices()
    if target == "h100":
        from qwenjax.kernels.gpu_target import h100_compile_only

        return [h100_compile_only()]
    from jax.experimental import topologies

    return topologies.get_topology_desc(target, platform="tpu").devices


def _roots(hlo: str) -> dict[str, str]:
    """Each computation's root op (a fusion's: what the fusion does in the end)."""
    roots, computation = {}, ""
    for line in hlo.splitlines():
        if line and not line.startswith(" "):
            computation = line.split(" ")[0].lstrip("%")
        elif line.lstrip().startswith("ROOT ") and (m := _INSTRUCTION.match(line)):
            roots[computation] = m.group(3)
    return roots


def large_writes(hlo: str, min_bytes: int) -> list[dict]:
    """Instructions of the entry computation and of loop bodies (not fusions' insides) whose
    result has at least `min_bytes`: `{op, shape, mib, name, computation, in_place}`.

    `in_place`: a slice update or scatter (or a fusion ending in one), which XLA runs in the
    buffer of its first operand, writing only the update; it is listed for its result's size,
    but where XLA cannot reuse the buffer it copies it first, and that copy is listed too."""
    roots = _roots(hlo)
    rows, computation = [], ""
    for line in hlo.splitlines():
        if line and not line.startswith(" "):
            computation = line.split(" ")[0] if not line.startswith("ENTRY") else "ENTRY"
            inside_fusion = "fused_" in computation or "_computation" in computation
            continue
        m = _INSTRUCTION.match(line)
        if not m or inside_fusion or not computation:
            continue
        name, result, op = m.groups()
        if op in _FREE:
            continue
        for dtype, dims in _ARRAY.findall(result):
            if dtype not in _BYTES or not dims:
                continue
            size = math.prod(int(d) for d in dims.split(",")) * _BYTES[dtype]
            if size >= min_bytes:
                fused = re.search(r"calls=%([\w.-]+)", line)
                kind = fused.group(1) if op == "fusion" and fused else op
                root = roots.get(kind, op) if op == "fusion" else op
                rows.append(
                    dict(op=kind, shape=f"{dtype}[{dims}]", mib=size / 2**20, name=name,
                         computation="entry" if computation == "ENTRY" else "loop body",
                         in_place=root in _IN_PLACE)
                )  # fmt: skip
    return rows


def compile_decode(
    target: str,
    *,
    blocks: int,
    batch: int,
    max_length: int,
    tokens: int,
    kernels: str,
    min_mib: float = 64,
    tensor: int = 1,
    commit: bool = False,
) -> dict:
    """Compiles one `extend` of `tokens` tokens for `target` (with `tensor` > 1: for that many
    of its devices, heads split over them; with `commit`, a speculative verification and the
    `commit` of each row's kept tokens after it, as the MTP step runs them); returns
    temporaries (per device), cache and weight bytes (all devices) and the writes of at least
    `min_mib`."""
    devices = devices_for(target)
    if tensor > len(devices):
        raise ValueError(f"--tensor {tensor}: {target} has {len(devices)} device(s)")
    config = qwenjax.ModelConfig.from_preset("qwen3.6-27b")
    layers = blocks * (config.num_hidden_layers // config.num_blocks)
    config = config.replace(num_hidden_layers=layers, layer_types=config.layer_types[:layers])
    graphdef, params = nnx.split(qwenjax.build(config, dtype=jnp.bfloat16, abstract=True))
    cache = jax.eval_shape(lambda: init_cache(config, batch, max_length, jnp.bfloat16))
    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
    keep = jax.ShapeDtypeStruct((batch,), jnp.int32)
    place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    if tensor == 1:
        on_device = jax.sharding.SingleDeviceSharding(devices[0])
        params, cache, ids, keep = jax.tree.map(
            lambda x: place(x, on_device), (params, cache, ids, keep)
        )
        rules = contextlib.nullcontext
    else:
        mesh = ax.make_mesh(ax.MeshConfig(fsdp=1, tensor=tensor), devices[:tensor])
        params = jax.tree.map(place, params, ax.param_shardings(params, mesh, ax.FSDP_TP_RULES))
        by_name = lambda x, names: place(x, NamedSharding(mesh, ax.spec(names, ax.FSDP_TP_RULES)))
        cache = jax.tree.map(by_name, cache, logical_axes(cache))  # (as the engine constrains it)
        ids = by_name(ids, (ax.BATCH, None))
        keep = by_name(keep, (ax.BATCH,))
        rules = lambda: ax.use_rules(mesh, ax.FSDP_TP_RULES)

    def step(params, cache, ids, keep):
        with rules():
            model = nnx.merge(graphdef, params)
            hidden, new, pending = model.extend(ids, cache, keep_pending=commit)
            return hidden, engine.commit(cache, new, pending, keep) if commit else new

    flags = {
        f"{k}_kernel": v for k, _, v in (p.partition("=") for p in kernels.split(",") if "=" in p)
    }
    platform = devices[0].platform if target == "local" else "gpu" if target == "h100" else "tpu"
    choice = kernel_flags(types.SimpleNamespace(**flags), platform)
    with choice.pinned() if kernels != "auto" else contextlib.nullcontext():
        jitted = jax.jit(lambda *a: step(*a), donate_argnums=1)  # a fresh trace
        compiled = jitted.lower(params, cache, ids, keep).compile()
    memory = compiled.memory_analysis()
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return {
        "target": target,
        "blocks": blocks,
        "batch": batch,
        "max_length": max_length,
        "tokens": tokens,
        "kernels": kernels,
        "tensor": tensor,
        "commit": commit,
        "temp_mib": memory.temp_size_in_bytes / 2**20,
        "cache_mib": nbytes(cache) / 2**20,
        "weight_mib": nbytes(params) / 2**20,
        "large_writes": large_writes(compiled.as_text(), min_mib * 2**20),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="h100",
                   help="h100, a TPU topology such as v5p:2x2x1, or local (this machine's "
                        "accelerator: what a newer jax's compiler does on a lent GPU)")  # fmt: skip
    p.add_argument("--blocks", type=int, default=2, help="super-blocks of the 27B (of 16)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 3])
    p.add_argument("--kernels", nargs="+", default=["auto"],
                   help="auto, or attention=NAME,gdn=NAME (the CLI's kernel flags)")  # fmt: skip
    p.add_argument("--min-mib", type=float, default=64)
    p.add_argument("--tensor", type=int, default=1, help="chips of a TPU topology, heads split")
    p.add_argument("--verify", action="store_true",
                   help="T > 1: verification and the commit of the kept drafts (MTP)")  # fmt: skip
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    stamp, rows = utc_stamp(), []
    label = jax.devices()[0].device_kind if args.target == "local" else args.target
    label += f" tensor={args.tensor}" if args.tensor > 1 else ""
    for tokens in args.tokens:
        for kernels in args.kernels:
            report = compile_decode(
                args.target, blocks=args.blocks, batch=args.batch, max_length=args.max_length,
                tokens=tokens, kernels=kernels, min_mib=args.min_mib, tensor=args.tensor,
                commit=args.verify and tokens > 1,
            )  # fmt: skip
            rows.append(report)
            print(json.dumps({k: v for k, v in report.items() if k != "large_writes"}), flush=True)
    lines = [
        f"# One decode step compiled for {label} (not timed), {stamp}, jax {jax.__version__}",
        "",
        f"27B geometry with {args.blocks} of its 16 super-blocks (scanned: one block's body is "
        f"what each block runs), {args.batch} rows x {args.max_length} cache slots, bf16, the "
        f"cache donated. Writes of at least {args.min_mib:.0f} MiB outside fusions' bodies, "
        "grouped; each is usually read back as well, except those in place (slice updates and "
        "scatters into their operand's buffer), which write only their update."
        + (f" Per chip, heads split over {args.tensor}." if args.tensor > 1 else ""),
    ]
    for r in rows:
        lines += [
            "",
            f"## T = {r['tokens']}{' verified and committed' if r['commit'] else ''}, "
            f"kernels: {r['kernels']}",
            "",
            f"Temporaries {r['temp_mib']:.0f} MiB; the whole cache is {r['cache_mib']:.0f} MiB, "
            f"the weights {r['weight_mib']:.0f} MiB.",
            "",
            "| where | op | result | MiB each | count | in place |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        groups = collections.Counter(
            (w["computation"], re.sub(r"\.\d+$", "", w["op"]), w["shape"], round(w["mib"]),
             "yes" if w["in_place"] else "")
            for w in r["large_writes"]
        )  # fmt: skip
        lines += [
            f"| {c} | {op} | {shape} | {mib} | {n} | {in_place} |"
            for (c, op, shape, mib, in_place), n in sorted(groups.items())
        ]
    device = re.sub(r"[\s:=]+", "-", label.lower()) + "-compile-only"
    meta = {"jax": jax.__version__, "target": label}
    write_results(
        args.out, "decode_hlo", stamp, rows, meta=meta, table="\n".join(lines), device=device
    )


if __name__ == "__main__":
    main()
