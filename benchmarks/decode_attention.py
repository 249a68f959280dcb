"""Attention over the KV cache while decoding: the xla path (every slot of the cache, what "auto"
runs today) against a Pallas decode kernel (only the keys each row can see): "pallas_gpu"
(Triton) on a GPU, "pallas_tpu" (Mosaic) on a TPU.

    python -m benchmarks.decode_attention                  # 27B layer: 16 and 32 slots, 32K cache
    python -m benchmarks.decode_attention --shapes small   # a quick run (interpreted off GPU/TPU)

A script, not a test. One gated-attention layer of the 27B (24 query and 4 KV heads, head dim
256, bf16 cache) for B slots of an S-slot cache, T queries a row (1: a decode step; 3: the
verification of 2 MTP drafts), rows filled to `short` (lengths drawn from 512..2048, the common
case of a server with a long --max-length) or `full` (every row at S). Columns: ms per call
(median of `--repeats` after warm-up, in this process), GB/s of the KV bytes the rows need (their
keys and values once) and its fraction of the measured copy peak, and the kernel's speed-up over
the xla path in the same run. Each run first checks the kernel against the fp32 reference math
on bf16 inputs (relative l2) and refuses to time a wrong kernel. Results go to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import measure_peaks, timed, utc_stamp, write_results
from qwenjax.kernels.attention import cache_attention

N, K, H = 24, 4, 256  # the 27B gated attention
SHAPES = {  # B slots, S cache slots
    "27b": [(16, 32768), (32, 32768), (32, 4096)],
    "small": [(4, 1024)],
}
FILLS = {"short": (512, 2048), "full": None}


def case(b: int, s: int, t: int, fill: str, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, N, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, K, s, H), jnp.bfloat16)  # the cache's [B, K, S, H]
    v = jax.random.normal(keys[2], (b, K, s, H), jnp.bfloat16)
    span = FILLS[fill]
    rng = np.random.default_rng(seed)
    lengths = np.full(b, s) if span is None else rng.integers(*span, b, endpoint=True)
    lengths = np.minimum(lengths, s)
    positions = jnp.asarray(lengths[:, None] - t + np.arange(t), jnp.int32)  # last at length - 1
    return (q, k, v, positions), lengths


def check(t: int, backend: str) -> float:
    """The kernel vs the fp32 reference math on bf16 inputs, relative l2 error."""
    args, _ = case(3, 3000, t, "short", seed=1)
    kernel = lambda q, k, v, p: cache_attention(q, k, v, q_positions=p, backend=backend)
    got = jax.jit(kernel)(*args)
    f32 = [x.astype(jnp.float32) for x in args[:3]]
    want = cache_attention(*f32, q_positions=args[3], backend="xla")
    return float(jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["27b"], choices=list(SHAPES))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 3])
    p.add_argument("--fills", nargs="+", default=list(FILLS), choices=list(FILLS))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--kernel", choices=["pallas_gpu", "pallas_tpu"], default=None,
                   help="default: pallas_tpu on a TPU, else pallas_gpu")  # fmt: skip
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = jax.devices()[0]
    stamp = utc_stamp()
    print(f"{device.device_kind}, jax {jax.__version__}, {stamp}", flush=True)
    kernel = args.kernel or ("pallas_tpu" if jax.default_backend() == "tpu" else "pallas_gpu")
    errors = {t: check(t, kernel) for t in args.tokens}
    print(f"{kernel} vs fp32 reference, bf16 inputs, relative l2:", errors, flush=True)
    assert max(errors.values()) < 2e-2, errors
    peaks = measure_peaks(matmul=False)
    print("peaks:", peaks, flush=True)
    rows, lines = [], []
    for b, s in (shape for name in args.shapes for shape in SHAPES[name]):
        for t in args.tokens:
            for fill in args.fills:
                inputs, lengths = case(b, s, t, fill)
                needed = 2 * int(lengths.sum()) * K * H * 2  # each row's keys and values, once
                times = {}
                for backend in ("xla", kernel):
                    fn = jax.jit(
                        lambda q, k, v, p, backend=backend: cache_attention(
                            q, k, v, q_positions=p, backend=backend
                        )
                    )
                    times[backend] = timed(fn, inputs, args.repeats)
                for backend, sec in times.items():
                    row = {
                        "slots": b,
                        "cache": s,
                        "tokens": t,
                        "fill": fill,
                        "impl": backend,
                        "ms": sec * 1e3,
                        "needed_gbps": needed / sec / 1e9,
                        "of_copy_peak": needed / sec / 1e9 / peaks["copy_gbps"],
                        "speedup_vs_xla": times["xla"] / sec,
                        "device": device.device_kind,
                        "date": stamp,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    lines.append(
                        f"| {b} | {s} | {t} | {fill} | {backend} | {row['ms']:.3f} "
                        f"| {row['needed_gbps']:.0f} | {row['of_copy_peak']:.2f} "
                        f"| {row['speedup_vs_xla']:.2f} |"
                    )
    table = "\n".join(
        [
            f"# Decode attention (27B layer: 24 : 4 heads, head dim 256, bf16), "
            f"{device.device_kind}, {stamp}",
            "",
            f"Kernel vs fp32 reference (relative l2, by T): {errors}. "
            f"Copy peak {peaks['copy_gbps']:.0f} GB/s.",
            "",
            "| slots | cache | T | fill | impl | ms | GB/s needed | of copy peak | vs xla |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *lines,
        ]
    )
    meta = {"check": errors, "peaks": peaks, "jax": jax.__version__}
    write_results(args.out, "decode_attention", stamp, rows, meta=meta, table=table)


if __name__ == "__main__":
    main()
