"""What every benchmark script shares: the timer, the torch child process, the result files."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp


def timed(fn, args, repeats: int) -> float:
    """Median wall time of `fn(*args)` over `repeats` runs, after one compiling and one warm run.

    The host clock around `block_until_ready` includes dispatch, which is what a caller pays.
    """
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_peaks(matmul: bool = True) -> dict:
    """This device's attainable peaks: a 2 GiB bf16 copy (GB/s, bytes read + written) and,
    with `matmul`, a bf16 8192^3 matmul (TFLOP/s): the denominators of the roofline columns."""
    # Ones, not random values: the copy's speed does not depend on them, and drawing 2^30 random
    # numbers on a CPU host holds ~17 GB of intermediates.
    x = jnp.ones((1 << 30,), jnp.bfloat16)
    peaks = {"copy_gbps": 2 * x.nbytes / timed(jax.jit(lambda x: x + 1), (x,), 10) / 1e9}
    del x
    if matmul:
        a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
        peaks["matmul_tflops"] = 2 * 8192**3 / timed(jax.jit(lambda x, y: x @ y), (a, a), 10) / 1e12
    return peaks


def add_scheduler_args(p, *, slots: int, max_length: int) -> None:
    """The model and engine flags of the serving-scheduler benchmarks."""
    p.add_argument("--model", default="tiny", help="a preset: tiny, qwen3.6-27b, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--slots", type=int, default=slots)
    p.add_argument("--max-length", type=int, default=max_length)
    p.add_argument("--prefill-chunk", type=int, default=256)


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")


def run_child(script: str, *argv: str, label: str) -> list[dict]:
    """Runs `python -c script argv...` and returns the JSON lines it prints; [] if it fails.

    Baselines written in torch (fla, SDPA) run in a child process so that torch and JAX never
    share a process (nor fight over GPU memory allocators).
    """
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True)
    if proc.returncode:
        print(f"{label} child failed:\n{proc.stderr[-3000:]}", flush=True)
        return []
    if proc.stderr:
        print(proc.stderr[-2000:], flush=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def write_results(
    out_dir: str,
    name: str,
    stamp: str,
    rows: list[dict],
    *,
    meta: dict,
    table: str,
    device: str | None = None,
) -> str:
    """`{stamp}_{device}_{name}.jsonl` (meta line, then one row per line) and `.md` (the table)
    under `out_dir`, named so that runs on other days and devices never overwrite each other;
    `device` defaults to this process's first device."""
    os.makedirs(out_dir, exist_ok=True)
    device = device or jax.devices()[0].device_kind.lower().replace(" ", "_")
    stem = os.path.join(out_dir, f"{stamp}_{device}_{name}")
    with open(stem + ".jsonl", "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wrote {stem}.jsonl and .md")
    return stem
