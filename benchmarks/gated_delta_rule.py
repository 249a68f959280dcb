"""Gated delta rule speed: forward and forward+backward, ours against our pure-JAX path and fla.

    python -m benchmarks.gated_delta_rule                    # 27B geometry, bf16, all backends
    python -m benchmarks.gated_delta_rule --shapes small --repeats 5 --no-fla

A script, not a test. For every shape it times, in this process on this device, our pure-JAX
chunked path ("chunked") and the Pallas GPU kernels ("pallas_gpu", one row per launch config);
with `--fla` (default when torch, CUDA and `fla` import) a child process first times
flash-linear-attention's Triton `chunk_gated_delta_rule` on the same shapes, so the ratios compare
like with like. Times are medians of `--repeats` runs after a warm-up (JAX: host clock around
`block_until_ready`; torch: `triton.testing.do_bench`, median).

Throughput columns use the nominal FLOPs of the chunked algorithm (per token and value head:
W S, Q S, K^T Vn = 3 * 2 dk dv; (Q K^T) Vn and the K K^T / Q K^T products = 2 C (dv + 2 dk);
U and W = 2 C (dv + dk); backward counted as 2x forward) and the fewest bytes (q, k, v, g, beta
read once, out written once), against the device's peaks measured at the start (a bf16
8192^3 matmul and a device-to-device copy).

Before timing, the Pallas kernels are checked on the device against the pure-JAX path in fp32
(forward, final state and every gradient; relative l2 error printed and required <= 1e-4).
Results go to `--out` as JSON lines plus a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os

# The torch child and this process share the GPU: JAX must not grab most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import measure_peaks, run_child, timed, utc_stamp, write_results
from qwenjax.kernels.gated_delta_rule.pallas_gpu import gated_delta_rule_pallas_gpu
from qwenjax.kernels.gated_delta_rule.xla import gated_delta_rule_chunked

HK, HV, DK, DV, CHUNK = 16, 48, 128, 128, 64  # the 27B layer geometry
SHAPES = {
    # (B, T, Hk, Hv, dk, dv): 27B geometry at 32K and 128K tokens, T in {4K, 32K}
    "27b": [
        (8, 4096, HK, HV, DK, DV),
        (1, 32768, HK, HV, DK, DV),
        (32, 4096, HK, HV, DK, DV),
        (4, 32768, HK, HV, DK, DV),
    ],
    # fla's usual benchmark setting: equal heads (no grouping), d = 128, 16K tokens
    "27b-32k": [(8, 4096, HK, HV, DK, DV), (1, 32768, HK, HV, DK, DV)],
    "fla": [(8, 2048, 16, 16, 128, 128), (2, 8192, 16, 16, 128, 128)],
    "small": [(2, 1024, 4, 12, 128, 128)],
}
# (block_v, num_warps, num_stages) launch configs tried for the Pallas kernels
CONFIGS = [(32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 8, 2)]


def flops(b, t, hk, hv, dk, dv, backward: bool) -> float:
    per = 3 * 2 * dk * dv + 2 * CHUNK * (dv + 2 * dk) + 2 * CHUNK * (dv + dk)
    fwd = b * t * hv * per
    return fwd * (3 if backward else 1)


def min_bytes(b, t, hk, hv, dk, dv, itemsize: int, backward: bool) -> float:
    io = b * t * (2 * hk * dk * itemsize + 2 * hv * dv * itemsize + 2 * hv * 4)
    return io * (2 if backward else 1)


def inputs(shape, dtype, seed):
    b, t, hk, hv, dk, dv = shape
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, t, hk, dk), dtype)
    k = jax.random.normal(ks[1], (b, t, hk, dk), dtype)
    v = jax.random.normal(ks[2], (b, t, hv, dv), dtype)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, hv), jnp.float32))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, hv), jnp.float32))
    return q, k, v, g, beta


def fwd_and_bwd(impl):
    fwd = jax.jit(lambda *a: impl(*a))

    def both(*a):
        (o, s), vjp = jax.vjp(impl, *a)
        return vjp((jnp.ones_like(o), jnp.ones_like(s)))

    return fwd, jax.jit(both)


def check_on_device(shape=(2, 300, 2, 6, 128, 128)) -> dict:
    """fp32 Pallas vs the pure-JAX path on the device: forward, state and all gradients."""
    q, k, v, g, beta = inputs(shape, jnp.float32, seed=7)
    b, t, _, hv, dk, dv = shape
    s0 = 0.1 * jax.random.normal(jax.random.key(8), (b, hv, dk, dv), jnp.float32)
    seg = (jnp.arange(t)[None, :] >= jnp.array([[t // 3], [t // 2]])).astype(jnp.int32)
    out = {}
    for label, impl in (("pallas_gpu", gated_delta_rule_pallas_gpu), ("chunked", None)):
        fn = impl or gated_delta_rule_chunked

        def loss(q, k, v, g, beta, s0, fn=fn):
            o, s = fn(q, k, v, g, beta, initial_state=s0, segment_ids=seg)
            w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
            return jnp.sum(o * w) + jnp.sum(s * s), (o, s)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))
        with jax.default_matmul_precision("highest"):
            out[label] = grad(q, k, v, g, beta, s0)
    (gp, (op, sp)), (gr, (orf, sr)) = out["pallas_gpu"], out["chunked"]

    def rel(a, b):
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

    errors = {"out": rel(op, orf), "state": rel(sp, sr)}
    names = ("q", "k", "v", "g", "beta", "s0")
    errors.update({f"d{n}": rel(a, b) for n, a, b in zip(names, gp, gr, strict=True)})
    return errors


def breakdown(shape, dtype, cfg_args, repeats: int) -> dict:
    """Times the parts of pallas_gpu apart: the terms that need no state (jnp and the UT
    transform kernel), the whole state pass, and each of its kernels alone (the sequential
    state_fwd and state_bwd, the parallel out_fwd, dv_local and dqkw)."""
    from qwenjax.kernels.gated_delta_rule import pallas_gpu as pg

    q, k, v, g, beta = inputs(shape, dtype, seed=1)
    b, _, hk, hv, dk, dv = shape
    low = dtype != jnp.float32
    bv, nw, ns = cfg_args
    cfg = pg._Config(
        block_v=bv,
        num_warps=nw,
        num_stages=ns,
        operand_dtype=dtype.name if low else "float32",
        interpret=None,
    )

    def terms_fn(q, k, v, g, beta):
        return pg._terms(cfg, q, k, v, g, beta, dk**-0.5, None, True, CHUNK)

    terms = jax.jit(terms_fn)(q, k, v, g, beta)
    s0 = jnp.zeros((b, hk, hv // hk, dk, dv), jnp.float32)
    pass_fwd = jax.jit(lambda t_, s: pg._state_pass(cfg, t_, s))

    def pass_both(t_, s):
        (o, sf), vjp = jax.vjp(lambda t_, s: pg._state_pass(cfg, t_, s), t_, s)
        return vjp((jnp.ones_like(o), jnp.ones_like(sf)))

    def terms_both(*a):
        def floats(*a):  # the float fields: runs (ints) take no cotangent
            return terms_fn(*a)._replace(runs=None)

        out, vjp = jax.vjp(floats, *a)
        return vjp(jax.tree.map(jnp.ones_like, out))

    def kernel(fn):
        return jax.jit(lambda *a: fn(cfg, *a))

    h, vn, _ = kernel(pg._state_fwd)(terms, s0)
    do = jnp.ones((b, terms.u.shape[1], CHUNK, hk, hv // hk, dv), vn.dtype)  # out's order
    dvl = kernel(pg._dv_local)(terms, do)
    dh, dvn, _ = kernel(pg._state_bwd)(terms, do, dvl, s0)
    kernels = {
        "state_fwd": (pg._state_fwd, (terms, s0)),
        "out_fwd": (pg._out_fwd, (terms, h, vn)),
        "dv_local": (pg._dv_local, (terms, do)),
        "state_bwd": (pg._state_bwd, (terms, do, dvl, s0)),
        "dqkw": (pg._dqkw, (terms, h, dh, vn, dvn, do)),
    }
    return {
        "terms_fwd_s": timed(jax.jit(terms_fn), (q, k, v, g, beta), repeats),
        "terms_fwd_bwd_s": timed(jax.jit(terms_both), (q, k, v, g, beta), repeats),
        "pass_fwd_s": timed(pass_fwd, (terms, s0), repeats),
        "pass_fwd_bwd_s": timed(jax.jit(pass_both), (terms, s0), repeats),
        **{f"{name}_s": timed(kernel(fn), a, repeats) for name, (fn, a) in kernels.items()},
    }


def run_fla(shapes, repeats: int) -> dict:
    """Times fla in a child process (torch and JAX kept apart); {} when fla is unavailable."""
    rows = run_child(_FLA_CHILD, json.dumps(shapes), str(repeats), label="fla")
    return {tuple(r["shape"]): r for r in rows}


_FLA_CHILD = r"""
import json, sys, torch, triton
from fla.ops.gated_delta_rule import chunk_gated_delta_rule
import fla
import fla.ops.common.chunk_o as chunk_o
# fla refuses its gated backward on Hopper with Triton < 3.7.1 (wrong results, fla #640); the
# device image has Triton 3.6 and no newer wheel fits the transfer limit. The guard is lifted
# for timing only: the backward's speed is what is compared, its values are not used.
chunk_o.TRITON_ABOVE_3_7_1 = True
shapes, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
print("fla", fla.__version__, "torch", torch.__version__, "triton", triton.__version__,
      file=sys.stderr)
for shape in shapes:
    b, t, hk, hv, dk, dv = shape
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(b, t, hk, dk, device=dev, dtype=bf, requires_grad=True)
    k = torch.randn(b, t, hk, dk, device=dev, dtype=bf, requires_grad=True)
    v = torch.randn(b, t, hv, dv, device=dev, dtype=bf, requires_grad=True)
    g = (-torch.nn.functional.softplus(torch.randn(b, t, hv, device=dev))).requires_grad_()
    beta = torch.sigmoid(torch.randn(b, t, hv, device=dev)).requires_grad_()
    def fwd():
        return chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True,
                                      use_qk_l2norm_in_kernel=True)
    def both():
        o, s = fwd()
        ones = (torch.ones_like(o), torch.ones_like(s))
        return torch.autograd.grad((o, s), (q, k, v, g, beta), ones)
    rep = max(100, 20 * repeats)
    ms_f = triton.testing.do_bench(fwd, warmup=50, rep=rep, return_mode="median")
    ms_b = triton.testing.do_bench(both, warmup=50, rep=rep, return_mode="median")
    print(json.dumps({"shape": shape, "fwd_s": ms_f / 1e3, "fwd_bwd_s": ms_b / 1e3}), flush=True)
    del q, k, v, g, beta
    torch.cuda.empty_cache()
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["27b", "fla"], choices=list(SHAPES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--configs",
        default=",".join(":".join(map(str, c)) for c in CONFIGS),
        help="block_v:num_warps:num_stages,... for the Pallas kernels",
    )
    p.add_argument("--fla", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--no-chunked", action="store_true", help="skip the pure-JAX baseline")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time pallas_gpu's stateless terms, its state pass and each of its kernels",
    )
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    shapes = [s for name in args.shapes for s in SHAPES[name]]
    configs = [tuple(map(int, c.split(":"))) for c in args.configs.split(",")]
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    stamp = utc_stamp()
    print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}, {stamp}", flush=True)

    fla = run_fla(shapes, args.repeats) if args.fla else {}
    peaks = measure_peaks()
    print(
        f"peaks: {peaks['matmul_tflops']:.0f} TFLOP/s bf16 matmul, "
        f"{peaks['copy_gbps']:.0f} GB/s copy",
        flush=True,
    )
    errors = check_on_device()
    print(
        "fp32 Pallas vs pure JAX on device (relative l2):",
        json.dumps({k: f"{v:.1e}" for k, v in errors.items()}),
        flush=True,
    )
    assert max(errors.values()) <= 1e-4, errors

    impls = {} if args.no_chunked else {"chunked": gated_delta_rule_chunked}
    for bv, nw, ns in configs:

        def impl(*a, bv=bv, nw=nw, ns=ns):
            return gated_delta_rule_pallas_gpu(*a, block_v=bv, num_warps=nw, num_stages=ns)

        impls[f"pallas_gpu bv={bv} w={nw} s={ns}"] = impl

    rows = []
    for shape in shapes:
        if args.breakdown:
            for c in configs:
                try:
                    parts = breakdown(shape, dtype, c, args.repeats)
                except Exception as e:
                    parts = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print("breakdown", shape, c, json.dumps(parts), flush=True)
                rows.append({"shape": list(shape), "impl": f"breakdown {c}", **parts})
        args_ = inputs(shape, dtype, seed=0)
        base = fla.get(tuple(shape), {})
        for name, impl in impls.items():
            fwd, both = fwd_and_bwd(impl)
            row = {
                "shape": list(shape),
                "impl": name,
                "dtype": dtype.name,
                "device": device.device_kind,
                "date": stamp,
            }
            try:
                row["fwd_s"] = timed(fwd, args_, args.repeats)
                row["fwd_bwd_s"] = timed(both, args_, args.repeats)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"{shape} {name}: {row['error']}", flush=True)
                rows.append(row)
                continue
            for key, bwd in (("fwd", False), ("fwd_bwd", True)):
                s = row[f"{key}_s"]
                row[f"{key}_tflops"] = flops(*shape, bwd) / s / 1e12
                row[f"{key}_gbps"] = min_bytes(*shape, dtype.itemsize, bwd) / s / 1e9
                if base:
                    row[f"{key}_vs_fla"] = base[f"{key}_s"] / s
            rows.append(row)
            print(json.dumps(row), flush=True)
        del args_
    lines = [
        f"# Gated delta rule, {device.device_kind}, {stamp}, {dtype.name}",
        "",
        f"Peaks measured here: {peaks['matmul_tflops']:.0f} TFLOP/s (bf16 matmul), "
        f"{peaks['copy_gbps']:.0f} GB/s (copy). Times in ms (median of {args.repeats}).",
        "",
        "| B, T, Hk, Hv, dk, dv | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd GB/s "
        "| fwd vs fla | fwd+bwd vs fla |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape in shapes:
        base = fla.get(tuple(shape))
        if base:
            lines.append(
                f"| {shape} | fla (torch/Triton) | {base['fwd_s'] * 1e3:.2f} "
                f"| {base['fwd_bwd_s'] * 1e3:.2f} | | | 1.00 | 1.00 |"
            )
        for r in rows:
            if r["shape"] != list(shape) or "fwd_s" not in r:
                continue
            lines.append(
                f"| {shape} | {r['impl']} | {r['fwd_s'] * 1e3:.2f} | {r['fwd_bwd_s'] * 1e3:.2f} "
                f"| {r['fwd_tflops']:.1f} | {r['fwd_gbps']:.0f} "
                f"| {r.get('fwd_vs_fla', float('nan')):.2f} "
                f"| {r.get('fwd_bwd_vs_fla', float('nan')):.2f} |"
            )
    meta = {"peaks": peaks, "check": errors, "fla": list(fla.values()), "jax": jax.__version__}
    write_results(args.out, "gated_delta_rule", stamp, rows, meta=meta, table="\n".join(lines))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
