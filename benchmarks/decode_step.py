"""Gated DeltaNet decode step: is the jnp path at the memory roofline, or would a kernel pay?

    python -m benchmarks.decode_step                          # 27B layer, B = 1 8 32 64
    python -m benchmarks.decode_step --batch 1 4 --tokens 1   # a quick CPU run

A script, not a test. Decoding one token through a GatedDeltaNet layer reads and writes the fp32
recurrent state [B, Hv, dk, dv] (3 MiB per row at the 27B geometry, 48 layers), which at batch
32 is about a tenth of a decode step's bytes beside the weights. Any implementation must read
it once and write it once, so `2 * state bytes / copy bandwidth` is the floor a fused kernel
could reach; this script measures how far the jnp step (`gated_delta_step`, the state donated so
it updates in place) is from that floor, beside the literal order of the equations (four reads,
two writes: the baseline the current arrangement replaced). For `--tokens` T > 1 (speculative
verification of T - 1 drafts) the model runs the token-serial path, timed per call.

Columns: ms per call (median of `--repeats` after warm-up), achieved GB/s of the
read-once-write-once traffic, its fraction of the measured copy peak, and the number of fusions
and library calls XLA compiled (each reads its operands from memory). A fused kernel pays only
where the fraction is well below 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.common import measure_peaks, utc_stamp, write_results
from qwenjax.kernels.gated_delta_rule import gated_delta_rule, gated_delta_step

HK, HV, D = 16, 48, 128  # the 27B GatedDeltaNet layer
_HIGHEST = jax.lax.Precision.HIGHEST


def literal_step(q, k, v, g, beta, state):
    """The equations in their written order (q, k already normalised): the baseline."""
    b = q.shape[0]
    s = state.reshape(b, HK, HV // HK, D, D)
    s = jnp.exp(g.reshape(b, HK, -1))[..., None, None] * s
    u = jnp.einsum("bkgeh,bke->bkgh", s, k, precision=_HIGHEST)
    delta = beta.reshape(b, HK, -1)[..., None] * (v.reshape(b, HK, -1, D) - u)
    s = s + k[:, :, None, :, None] * delta[:, :, :, None, :]
    o = jnp.einsum("bkgeh,bke->bkgh", s, q, precision=_HIGHEST)
    return o.reshape(b, HV, D), s.reshape(state.shape)


def qwenjax_step(q, k, v, g, beta, state):
    return gated_delta_step(q, k, v, g, beta, state, use_qk_l2norm=False)


def qwenjax_tokens(q, k, v, g, beta, state):
    return gated_delta_rule(
        q, k, v, g, beta, initial_state=state, use_qk_l2norm=False, backend="reference"
    )


def inputs(batch: int, tokens: int, dtype) -> tuple:
    ks = jax.random.split(jax.random.key(0), 6)
    lead = (batch,) if tokens == 1 else (batch, tokens)
    unit = lambda key, shape: jax.random.normal(key, shape, jnp.float32) / D**0.5
    q = unit(ks[0], (*lead, HK, D)).astype(dtype)
    k = unit(ks[1], (*lead, HK, D)).astype(dtype)
    v = jax.random.normal(ks[2], (*lead, HV, D), dtype)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (*lead, HV)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (*lead, HV)))
    state = 0.1 * jax.random.normal(ks[5], (batch, HV, D, D), jnp.float32)
    return (q, k, v, g, beta), state


def time_step(fn, xs, state, repeats: int) -> tuple[float, dict]:
    """Median seconds per call, the state threaded through (donated, so updated in place)."""
    step = jax.jit(lambda state, *xs: fn(*xs, state)[1], donate_argnums=0)
    hlo = jax.jit(lambda state, *xs: fn(*xs, state)).lower(state, *xs).compile().as_text()
    counts = {"fusions": hlo.count(" fusion("), "library_calls": hlo.count(" custom-call(")}
    state = jax.block_until_ready(step(step(state, *xs), *xs))  # compile, warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = jax.block_until_ready(step(state, *xs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 3], help="1: decode; >1: verify")
    p.add_argument("--dtype", default="bfloat16", help="of q, k, v (the state is fp32)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device, stamp = jax.devices()[0], utc_stamp()
    print(f"{device.device_kind}, jax {jax.__version__}, {stamp}", flush=True)
    peaks = measure_peaks(matmul=False)
    print(f"copy peak {peaks['copy_gbps']:.0f} GB/s", flush=True)
    rows = []
    for batch in args.batch:
        for tokens in args.tokens:
            xs, state = inputs(batch, tokens, jnp.dtype(args.dtype))
            floor_bytes = 2 * state.nbytes  # read once, write once, per call
            impls = {"qwenjax": qwenjax_step} if tokens == 1 else {"qwenjax": qwenjax_tokens}
            if tokens == 1:
                impls["literal order"] = literal_step
            for name, fn in impls.items():
                seconds, counts = time_step(fn, xs, jnp.copy(state), args.repeats)
                gbps = floor_bytes / seconds / 1e9
                row = dict(
                    impl=name,
                    batch=batch,
                    tokens=tokens,
                    ms=seconds * 1e3,
                    state_mib=state.nbytes / 2**20,
                    gbps=gbps,
                    of_copy_peak=gbps / peaks["copy_gbps"],
                    **counts,
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = [
        f"# GatedDeltaNet decode step, 27B layer, {device.device_kind}, {stamp}, {args.dtype}",
        "",
        f"Copy peak measured here: {peaks['copy_gbps']:.0f} GB/s. GB/s counts one read and one "
        "write of the fp32 state per call.",
        "",
        "| B | T | impl | ms | state MiB | GB/s | of copy peak | fusions | library calls |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['batch']} | {r['tokens']} | {r['impl']} | {r['ms']:.3f} | {r['state_mib']:.0f} "
        f"| {r['gbps']:.0f} | {r['of_copy_peak']:.2f} | {r['fusions']} | {r['library_calls']} |"
        for r in rows
    ]
    meta = {"peaks": peaks, "jax": jax.__version__, "dtype": args.dtype}
    write_results(args.out, "decode_step", stamp, rows, meta=meta, table="\n".join(lines))


if __name__ == "__main__":
    main()
