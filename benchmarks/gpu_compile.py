"""Compile the Pallas GPU gated delta rule for an H100 on a machine without a GPU, and report what
each Triton kernel will launch with: grid, threads, shared memory, registers and spills.

    python -m benchmarks.gpu_compile                       # 27B layer, bf16, B=1, T=4096
    python -m benchmarks.gpu_compile --configs 64:8:2 --seq 4096 32768

Needs this jaxlib's CUDA plugin importable (`jax[cuda12-local]`, or the `.cuda-plugin/<jax
version>` directory the tests install, on PYTHONPATH), ptxas for the register counts (the
`nvidia-cuda-nvcc-cu12` wheel, or PATH), and no GPU.

A script, not a test, and not a timing. XLA compiles deviceless for an H100 SXM
(`qwenjax.kernels.gpu_target`: sm_90, 132 SMs, 227 KB of shared memory a block), so Triton
lowers every kernel and XLA lays out the launches, which it dumps; ptxas then reports the
registers and local-memory spills of each kernel's PTX. What it catches before a GPU
session is spent on it: a kernel that does not compile for sm_90, shared memory over the limit,
spills (each a round trip to local memory per thread), and the XLA temporaries of the forward
and the forward+backward. Results go to `--out` as `{stamp}_h100-compile-only_gpu_compile.*`.
"""

from __future__ import annotations

import os
import tempfile

# Before jax is imported: the CUDA plugin registers without a GPU (no version probe of a
# device), nothing but the CPU backend starts, and XLA dumps the PTX and launches we read.
_DUMP = tempfile.mkdtemp(prefix="qwenjax-gpu-compile-")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={_DUMP}".strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import utc_stamp, write_results  # noqa: E402
from benchmarks.decode_hlo import large_writes  # noqa: E402
from qwenjax.kernels.gated_delta_rule.pallas_gpu import gated_delta_rule_pallas_gpu  # noqa: E402
from qwenjax.kernels.gpu_target import h100_compile_only  # noqa: E402

HK, HV, DK, DV = 16, 48, 128, 128  # the 27B layer geometry
ORDER = ["ut", "state_fwd", "out_fwd", "dv_local", "state_bwd", "dqkw", "ut_bwd"]  # call order
CONFIGS = "64:4:2,64:8:2,32:4:2,64:4:3"  # block_v:num_warps:num_stages
_THUNK = re.compile(
    r"(gated_delta_rule_\w+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+)"
)
_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def find_ptxas() -> str | None:
    """ptxas from the nvidia-cuda-nvcc wheel or PATH; None: launches only, no register counts."""
    try:
        import nvidia.cuda_nvcc

        path = os.path.join(next(iter(nvidia.cuda_nvcc.__path__)), "bin", "ptxas")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("ptxas")


def kernels_of(module: str, ptxas: str | None) -> list[dict]:
    """Every Triton kernel XLA compiled for jitted function `module`: launch and ptxas report."""
    launches = {}
    for path in glob.glob(os.path.join(_DUMP, f"module_*.{module}.thunk_sequence.txt")):
        with open(path) as f:
            thunks = f.read()
        for name, grid, threads, smem in _THUNK.findall(thunks):
            launches[name] = {
                "grid": [int(x) for x in grid.split(",")],
                "threads": int(threads.split(",")[0]),
                "shared_kib": int(smem) / 1024,
            }
    rows = []
    for path in sorted(glob.glob(os.path.join(_DUMP, f"module_*.{module}.*.ptx"))):
        with open(path) as f:
            entry = re.search(r"\.entry (gated_delta_rule_\w+)\(", f.read())
        if entry is None or entry.group(1) not in launches:
            continue  # XLA's own fusions
        name = entry.group(1).removeprefix("gated_delta_rule_")
        if ptxas is None:
            rows.append({"kernel": name, **launches.pop(entry.group(1))})
            continue
        report = subprocess.run(
            [ptxas, "-v", "-arch=sm_90a", path, "-o", os.devnull], capture_output=True, text=True
        )
        if report.returncode:
            raise RuntimeError(f"ptxas failed on {entry.group(1)}:\n{report.stderr[-2000:]}")
        stats = {k: int(m.group(1)) for k, r in _PTXAS.items() if (m := r.search(report.stderr))}
        rows.append({"kernel": name, **launches.pop(entry.group(1)), **stats})
    return sorted(rows, key=lambda r: ORDER.index(r["kernel"]) if r["kernel"] in ORDER else 99)


def xla_writes_mib(hlo: str) -> float:
    """MiB that XLA's own instructions (fusions, copies, transposes: everything at the top
    level but the kernels' custom calls and views) write in the optimized `hlo`: the traffic
    around the kernels, e.g. a transpose of v into the kernels' layout."""
    return sum(w["mib"] for w in large_writes(hlo, 0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", default=CONFIGS, help="block_v:num_warps:num_stages,...")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, nargs="+", default=[4096])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    configs = [tuple(map(int, c.split(":"))) for c in args.configs.split(",")]
    dtype, ptxas, stamp = jnp.dtype(args.dtype), find_ptxas(), utc_stamp()
    try:
        sharding = jax.sharding.SingleDeviceSharding(h100_compile_only())
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    print(f"compile-only for an H100 (sm_90a), jax {jax.__version__}, {stamp}", flush=True)
    if ptxas is None:
        print("no ptxas (pip install nvidia-cuda-nvcc-cu12): no register counts", flush=True)

    rows = []
    for t in args.seq:
        b = args.batch

        def spec(*shape, dt=jnp.float32):
            return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

        specs = (spec(b, t, HK, DK, dt=dtype), spec(b, t, HK, DK, dt=dtype))
        specs += (spec(b, t, HV, DV, dt=dtype), spec(b, t, HV), spec(b, t, HV))
        for bv, nw, ns in configs:

            def fwd(*a, bv=bv, nw=nw, ns=ns):
                return gated_delta_rule_pallas_gpu(*a, block_v=bv, num_warps=nw, num_stages=ns)

            def fwd_bwd(*a, fwd=fwd):  # cotangents as inputs, as a training step has them
                _, vjp = jax.vjp(fwd, *a[:5])
                return vjp(a[5:])

            cotangents = (spec(b, t, HV, DV, dt=dtype), spec(b, HV, DK, DV))
            for what, fn, args_ in (("fwd", fwd, specs), ("fwd_bwd", fwd_bwd, specs + cotangents)):
                fn.__name__ = module = f"gdn_{what}_{b}x{t}_{bv}_{nw}_{ns}"
                row = {"what": what, "shape": [b, t, HK, HV, DK, DV], "config": [bv, nw, ns]}
                t0 = time.perf_counter()
                try:
                    compiled = jax.jit(fn).lower(*args_).compile()
                except Exception as e:  # a kernel that does not compile for sm_90 is a result
                    row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                else:
                    row["temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
                    row["kernels"] = kernels_of(f"jit_{module}", ptxas)
                    row["xla_writes_mib"] = xla_writes_mib(compiled.as_text())
                row["compile_s"] = time.perf_counter() - t0
                rows.append(row)
                print(json.dumps(row), flush=True)

    lines = [
        f"# Pallas GPU gated delta rule, compiled for an H100 without one, {stamp}, {dtype.name}",
        "",
        "Compile-only (XLA deviceless, ptxas -v for sm_90a): launches and registers, no timing.",
        "XLA MiB: what XLA's own instructions around the kernels write (fusions, transposes).",
        "",
        "| what | B×T | block_v:warps:stages | temp MiB | XLA MiB | kernel | grid | threads "
        "| smem KiB | regs | spill st/ld B |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['what']} | {row['shape'][0]}×{row['shape'][1]} | " + ":".join(
            map(str, row["config"])
        )
        if "error" in row:
            lines.append(f"{head} | — | — | {row['error'][:120]} | | | | | |")
            continue
        seen = collections.Counter()
        for k in row["kernels"]:
            seen[k["kernel"]] += 1
            if seen[k["kernel"]] > 1:
                continue  # the forward kernels recompiled inside the backward: same report
            lines.append(
                f"{head} | {row['temp_mib']:.0f} | {row['xla_writes_mib']:.0f} | {k['kernel']} | "
                f"{k['grid']} | {k['threads']} | "
                f"{k['shared_kib']:.0f} | {k.get('registers', '?')} | "
                f"{k.get('spill_stores', 0)}/{k.get('spill_loads', 0)} |"
            )
    meta = {"target": "H100 SXM (sm_90a), compile-only", "jax": jax.__version__, "date": stamp}
    write_results(
        args.out,
        "gpu_compile",
        stamp,
        rows,
        meta=meta,
        table="\n".join(lines),
        device="h100-compile-only",
    )
    shutil.rmtree(_DUMP, ignore_errors=True)


if __name__ == "__main__":
    main()
