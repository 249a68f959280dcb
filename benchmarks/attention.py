"""Attention speed at head dim 256 with GQA 24:4 (the 27B gated attention), fwd and fwd+bwd.

    python -m benchmarks.attention                 # 27B geometry, bf16, causal
    python -m benchmarks.attention --shapes small --no-torch

A script, not a test. Times, in this process on this device: `jax.nn.dot_product_attention`
with cuDNN ("cudnn") and with XLA ("xla"), JAX's Pallas Triton flash attention
(`jax.experimental.pallas.ops.gpu.attention.mha`, KV heads repeated since it has no GQA, 64 x 64
blocks), and qwenjax's own entry point (`qwenjax.kernels.attention`, backend "auto"; with packed
documents also backend "pallas_gpu", the candidate to replace cuDNN's dense mask there); with
`--torch` a child process first times torch's `scaled_dot_product_attention` (flash / cuDNN /
efficient backends, whichever torch picks) on the same shapes. Medians of `--repeats` runs after
warm-up. FLOPs are the causal count, 4 B N T^2 H / 2 forward and 3.5x that for fwd+bwd
(FlashAttention's convention: backward 2.5x forward). Results go to `--out` as JSON lines and a
markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

from benchmarks.common import run_child, timed, utc_stamp, write_results
from qwenjax.kernels.attention import attention

SHAPES = {
    "27b": [(8, 4096, 24, 4, 256), (1, 32768, 24, 4, 256)],  # B, T, N, K, H: 32K tokens
    "small": [(2, 1024, 24, 4, 256)],
}


def causal_flops(b, t, n, h, backward: bool) -> float:
    fwd = 4 * b * n * t * t * h / 2
    return fwd * (3.5 if backward else 1.0)


def _impls(t: int) -> dict:
    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    def pallas_triton(q, k, v):
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention

        rep = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        # 64 x 64 blocks: the default 128-query blocks overflow shared memory at head dim 256
        blocks = pallas_attention.BlockSizes(*[64] * 6)
        return pallas_attention.mha(
            q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True, block_sizes=blocks
        )

    def ours(q, k, v, packed=False, backend="auto"):
        pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        seg = (pos >= q.shape[1] // 3).astype(jnp.int32) if packed else None
        return attention(
            q,
            k,
            v,
            q_positions=pos,
            kv_positions=pos,
            q_segment_ids=seg,
            kv_segment_ids=seg,
            positions_in_order=True,
            backend=backend,
        )

    impls = {
        "cudnn": cudnn,
        "xla": xla,
        "pallas_triton": pallas_triton,
        "qwenjax": ours,
        "qwenjax 2 documents": functools.partial(ours, packed=True),
        "qwenjax 2 documents pallas_gpu": functools.partial(
            ours, packed=True, backend="pallas_gpu"
        ),
    }
    return impls


_TORCH_CHILD = r"""
import json, sys, torch, triton
import torch.nn.functional as F
shapes, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
print("torch", torch.__version__, file=sys.stderr)
for b, t, n, kh, h in shapes:
    q = torch.randn(b, n, t, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, kh, t, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, kh, t, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    def both():
        o = fwd()
        return torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    rep = max(100, 20 * repeats)
    f = triton.testing.do_bench(fwd, warmup=50, rep=rep, return_mode="median")
    fb = triton.testing.do_bench(both, warmup=50, rep=rep, return_mode="median")
    print(json.dumps({"shape": [b, t, n, kh, h], "fwd_s": f / 1e3, "fwd_bwd_s": fb / 1e3}))
"""


def check_on_device() -> dict:
    """qwenjax's "auto" attention (cuDNN on GPU) vs the reference math, packed and not, and the
    "pallas_gpu" backend on the packed case."""
    from qwenjax.kernels.attention.reference import attention_mask, attention_reference

    b, t, n, kh, h = 2, 1000, 24, 4, 256
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, kh, h), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, kh, h), jnp.float32).astype(jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    errors = {}
    packed = (pos >= jnp.array([[300], [701]])) * 1
    cases = (("causal", None, "auto"), ("packed", packed, "auto"))
    for label, seg, backend in (*cases, ("packed pallas_gpu", packed, "pallas_gpu")):
        got = attention(
            q,
            k,
            v,
            q_positions=pos,
            kv_positions=pos,
            q_segment_ids=seg,
            kv_segment_ids=seg,
            positions_in_order=True,
            backend=backend,
        )
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        want = attention_reference(*f32, attention_mask(seg, seg, pos, pos, True), h**-0.5)
        errors[label] = float(
            jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want)
        )
    return errors


def run_torch(shapes, repeats: int) -> dict:
    rows = run_child(_TORCH_CHILD, json.dumps(shapes), str(repeats), label="torch")
    return {tuple(r["shape"]): r for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["27b"], choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    shapes = [s for name in args.shapes for s in SHAPES[name]]
    device = jax.devices()[0]
    stamp = utc_stamp()
    print(f"{device.device_kind}, jax {jax.__version__}, {stamp}", flush=True)
    base = run_torch(shapes, args.repeats) if args.torch else {}
    errors = check_on_device()
    print("qwenjax attention vs fp32 reference, bf16 inputs, relative l2:", errors)
    assert max(errors.values()) < 2e-2, errors
    rows = []
    for shape in shapes:
        b, t, n, kh, h = shape
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
        k = jax.random.normal(keys[1], (b, t, kh, h), jnp.bfloat16)
        v = jax.random.normal(keys[2], (b, t, kh, h), jnp.bfloat16)
        ref = None
        for name, fn in _impls(t).items():
            row = {"shape": list(shape), "impl": name, "device": device.device_kind, "date": stamp}
            try:
                fwd = jax.jit(fn)
                out = fwd(q, k, v)
                if ref is None:
                    ref = out.astype(jnp.float32)
                row["rel_err_vs_cudnn"] = float(
                    jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
                )
                both = jax.jit(
                    jax.grad(
                        lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum(),
                        argnums=(0, 1, 2),
                    )
                )
                row["fwd_s"] = timed(fwd, (q, k, v), args.repeats)
                row["fwd_bwd_s"] = timed(both, (q, k, v), args.repeats)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"{shape} {name}: {row['error']}", flush=True)
                rows.append(row)
                continue
            for key, bwd in (("fwd", False), ("fwd_bwd", True)):
                row[f"{key}_tflops"] = causal_flops(b, t, n, h, bwd) / row[f"{key}_s"] / 1e12
                if tuple(shape) in base:
                    row[f"{key}_vs_torch"] = base[tuple(shape)][f"{key}_s"] / row[f"{key}_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        f"# Attention (causal, GQA, bf16), {device.device_kind}, {stamp}",
        "",
        "| B, T, N, K, H | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s "
        "| fwd vs torch | fwd+bwd vs torch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape in shapes:
        tb = base.get(tuple(shape))
        if tb:
            b, t, n, _, h = shape
            lines.append(
                f"| {shape} | torch sdpa | {tb['fwd_s'] * 1e3:.2f} | {tb['fwd_bwd_s'] * 1e3:.2f} "
                f"| {causal_flops(b, t, n, h, False) / tb['fwd_s'] / 1e12:.0f} "
                f"| {causal_flops(b, t, n, h, True) / tb['fwd_bwd_s'] / 1e12:.0f} | 1.00 | 1.00 |"
            )
        for r in rows:
            if r["shape"] == list(shape) and "error" not in r:
                lines.append(
                    f"| {shape} | {r['impl']} | {r['fwd_s'] * 1e3:.2f} "
                    f"| {r['fwd_bwd_s'] * 1e3:.2f} "
                    f"| {r['fwd_tflops']:.0f} | {r['fwd_bwd_tflops']:.0f} "
                    f"| {r.get('fwd_vs_torch', float('nan')):.2f} "
                    f"| {r.get('fwd_bwd_vs_torch', float('nan')):.2f} |"
                )
    meta = {"torch": list(base.values()), "check": errors, "jax": jax.__version__}
    write_results(args.out, "attention", stamp, rows, meta=meta, table="\n".join(lines))


if __name__ == "__main__":
    main()
