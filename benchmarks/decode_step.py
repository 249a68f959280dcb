"""Gated DeltaNet decode step: the jnp path against the memory roofline and the decode kernel.

    python -m benchmarks.decode_step                          # 27B layer, B = 1 8 32 64
    python -m benchmarks.decode_step --batch 1 4 --tokens 1   # a quick CPU run (no kernel)

A script, not a test. Decoding one token through a GatedDeltaNet layer reads and writes the fp32
recurrent state [B, Hv, dk, dv] (3 MiB per row at the 27B geometry, 48 layers), which at batch
32 is about a tenth of a decode step's bytes beside the weights. Any implementation must read
it once and write it once, so `2 * state bytes / copy bandwidth` is the floor a fused kernel
could reach; this script measures how far the jnp step (`gated_delta_step`, the state donated so
it updates in place) is from that floor, beside the literal order of the equations (four reads,
two writes: the baseline the current arrangement replaced). For `--tokens` T > 1 (speculative
verification of T - 1 drafts) the jnp path is the token-serial scan, timed per call. "jnp in
stack" is what the model runs: the state as a layer of the stacked states, on TPU and GPU read
twice and written once for all T tokens (`delta_rule_steps_by_sums`, up to 8 tokens; checked
against the jnp path first), on CPU copied out and advanced as "jnp" is.

On a GPU or TPU the platform's Pallas decode kernel (`gated_delta_decode`, backend
"pallas_gpu" / "pallas_tpu": the state read once and written once for all T tokens) is timed in
the same run, after a check against the jnp path; on a GPU for each `--block-v` (the value
columns a Triton program holds). `--kernel` forces one elsewhere (interpreted: a dry run whose
times mean nothing).

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
from qwenjax.kernels.gated_delta_rule import decode_pallas_gpu, gated_delta_decode

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


def decode_path(backend: str, block_v: int | None = None, in_stack: bool = False):
    """`gated_delta_decode` on `backend` for `[B, ...]` one token or `[B, T, ...]` tokens;
    with `block_v`, the Pallas GPU kernel called directly at that value block; `in_stack`: the
    state as layer 0 of a stack, as the model's scan passes it (the jnp path then works on the
    layer where it lies, `delta_rule_steps_by_sums`)."""

    def fn(q, k, v, g, beta, state):
        one = q.ndim == 3
        if one:
            q, k, v, g, beta = (x[:, None] for x in (q, k, v, g, beta))
        if in_stack:
            o, stack = gated_delta_decode(
                q, k, v, g, beta, state[None], use_qk_l2norm=False, layer=0, backend=backend
            )
            state = stack[0]
        elif block_v is None:
            o, state = gated_delta_decode(
                q, k, v, g, beta, state, use_qk_l2norm=False, backend=backend
            )
        else:  # q, k as the kernel takes them: fp32, scaled; the state as a stack of one
            q, k = (x.astype(jnp.float32) for x in (q * D**-0.5, k))
            o, stack = decode_pallas_gpu.gated_delta_decode_pallas_gpu(
                q, k, v, g, beta, state[None], 0, block_v=block_v
            )
            state = stack[0]
        return (o[:, 0] if one else o), state

    return fn


jnp_path = decode_path("xla")  # the step for one token, the token-serial scan for more
jnp_in_stack = decode_path("xla", in_stack=True)  # the model's default decode


def check(fn, xs, state) -> float:
    """max |kernel - jnp| / max |jnp| over the output and new state, in fp32."""
    want = jax.jit(jnp_path)(*xs, state)
    got = jax.jit(fn)(*xs, state)
    errs = [
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) / jnp.max(jnp.abs(b)))
        for a, b in zip(got, want, strict=True)
    ]
    return max(errs)


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
    p.add_argument("--kernel", default=None, choices=["pallas_gpu", "pallas_tpu", "none"],
                   help="decode kernel to time (default: the platform's; none on CPU)")  # fmt: skip
    p.add_argument("--block-v", type=int, nargs="+", default=[8, 16, 32],
                   help="pallas_gpu: value columns a program holds, each timed")  # fmt: skip
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    kernel = args.kernel or {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend())
    kernels = {}
    if kernel == "pallas_gpu":
        kernels = {f"pallas_gpu bv={bv}": decode_path(kernel, bv) for bv in args.block_v}
    elif kernel == "pallas_tpu":
        kernels = {"pallas_tpu": decode_path(kernel)}
    device, stamp = jax.devices()[0], utc_stamp()
    print(f"{device.device_kind}, jax {jax.__version__}, {stamp}", flush=True)
    peaks = measure_peaks(matmul=False)
    print(f"copy peak {peaks['copy_gbps']:.0f} GB/s", flush=True)
    rows = []
    for batch in args.batch:
        for tokens in args.tokens:
            xs, state = inputs(batch, tokens, jnp.dtype(args.dtype))
            floor_bytes = 2 * state.nbytes  # read once, write once, per call
            impls = {"jnp": jnp_path}
            if tokens == 1:
                impls["literal order"] = literal_step
            for name, fn in {"jnp in stack": jnp_in_stack, **kernels}.items():
                err = check(fn, xs, state)
                if err > 2e-2:  # bf16 outputs; the state itself agrees to ~1e-6
                    raise SystemExit(f"{name} disagrees with the jnp path: {err:.2e}")
                impls[name] = fn
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
