"""Generation throughput: prefill and decode tokens/s, plain and with MTP speculation.

    python benchmarks/generate.py --model tiny --batch 1 8 --prompt-len 128 --new-tokens 64
    python benchmarks/generate.py --model qwen3.6-27b --dtype bfloat16 --batch 1 32 \\
        --prompt-len 1024 --new-tokens 256 --speculative-tokens 0 2 --out results.jsonl

Random weights (the shapes are what matter for speed; a 27B bf16 model fits one H100), or
`--checkpoint DIR` for trained ones (e.g. the demo's, where the MTP head has learned). Each
configuration compiles once, then runs `--repeats` times; the median is reported. The decode
roofline is the time to stream the weights once per step at `--bandwidth` GB/s: batch-1 decode
cannot beat it, so `roofline tok/s = bandwidth / weight bytes` (× batch). `--kernels auto
attention=pallas_gpu attention=pallas_gpu,gdn=pallas_gpu` times kernel choices side by side
(the `--attention-kernel` / `--gdn-kernel` flags of `qwenjax generate`), each in its own engine.
Speculative rows also report the acceptance rate, which on random weights is near zero; a
trained MTP head accepts far more, so only the plain rows say anything about kernels here.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.api import build, param_count
from qwenjax.checkpoint import load
from qwenjax.config import ModelConfig
from qwenjax.inference.engine import Engine
from qwenjax.inference.sampling import SamplingParams
from qwenjax.kernels.choice import kernel_flags

# HBM bandwidth (GB/s) by device kind, for the roofline column when --bandwidth is not given.
BANDWIDTH = {"H100": 3350.0, "H200": 4800.0, "TPU v5p": 2765.0, "TPU v6e": 1640.0}


def _bandwidth(device: jax.Device, given: float | None) -> float | None:
    if given:
        return given
    kind = device.device_kind
    return next((bw for name, bw in BANDWIDTH.items() if name in kind), None)


def _kernel_spec(spec: str) -> types.SimpleNamespace:
    """ "auto" or "attention=pallas_gpu,gdn=pallas_gpu" as the flags `kernel_flags` reads."""
    flags = {}
    for part in [] if spec == "auto" else spec.split(","):
        key, _, value = part.partition("=")
        if key not in ("attention", "gdn") or not value:
            raise SystemExit(f"--kernels {spec!r}: expected auto or attention=NAME,gdn=NAME")
        flags[f"{key}_kernel"] = value
    return types.SimpleNamespace(**flags)


def run(args: argparse.Namespace) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    if args.checkpoint:  # trained weights: the MTP acceptance rate means something
        model = load(args.checkpoint, dtype=dtype)
        config = model.config
    else:
        config = ModelConfig.from_preset(args.model)
        model = jax.jit(lambda: build(config, dtype=dtype, param_dtype=dtype, seed=0))()
    weights = param_count(model, include_mtp=False) * dtype.itemsize
    engines = {}
    for name in args.kernels:  # each engine keeps the pins it is built under
        try:
            choice = kernel_flags(_kernel_spec(name), jax.default_backend())
        except ValueError as e:
            raise SystemExit(f"--kernels {name}: {e}") from None
        with choice.pinned():
            engines[name] = Engine(model)
    device = jax.devices()[0]
    bandwidth = _bandwidth(device, args.bandwidth)
    rng = np.random.default_rng(0)
    results = []
    for batch in args.batch:
        prompts = rng.integers(0, config.vocab_size, (batch, args.prompt_len)).tolist()
        params = [SamplingParams(temperature=0.0)] * batch
        for k, (kernel, engine) in itertools.product(args.speculative_tokens, engines.items()):
            kw = dict(max_new_tokens=args.new_tokens, num_speculative_tokens=k)
            prefill, decode, accept = [], [], None
            for i in range(args.repeats + 1):  # the first run compiles
                t0 = time.perf_counter()
                state, req, opts = engine.start(prompts, params, **kw)
                jax.block_until_ready(state.tokens)
                t1 = time.perf_counter()
                state = engine.step(state, req, opts, args.new_tokens)
                jax.block_until_ready(state.tokens)
                t2 = time.perf_counter()
                out = engine.finish(state, opts)
                if i:
                    prefill.append(t1 - t0)
                    decode.append(t2 - t1)
                    accept = out.acceptance_rate
            new = int(out.lengths.sum()) - batch  # the first token comes from the prefill
            row = {
                "model": args.checkpoint or args.model,
                "dtype": args.dtype,
                "device": device.device_kind,
                "batch": batch,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "speculative_tokens": k,
                "kernels": kernel,
                "prefill_s": statistics.median(prefill),
                "prefill_tok_s": batch * args.prompt_len / statistics.median(prefill),
                "decode_s": statistics.median(decode),
                "decode_tok_s": new / statistics.median(decode),
                "acceptance_rate": accept,
                "weight_bytes": weights,
                "roofline_decode_tok_s": (
                    batch * bandwidth * 1e9 / weights if bandwidth and not k else None
                ),
                "repeats": args.repeats,
            }
            results.append(row)
            roof = row["roofline_decode_tok_s"]
            print(
                f"batch {batch:3d}  k={k}  {kernel:20s}  "
                f"prefill {row['prefill_tok_s']:10.1f} tok/s  "
                f"decode {row['decode_tok_s']:9.1f} tok/s"
                + (f"  (roofline {roof:.1f})" if roof else "")
                + (f"  accept {accept:.2f}" if accept is not None else ""),
                flush=True,
            )
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="a preset: tiny, qwen3.6-27b, ...")
    p.add_argument("--checkpoint", default=None, help="load this checkpoint instead of a preset")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--speculative-tokens", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kernels", nargs="+", default=["auto"],
                   help="kernel choices to time, each in its own engine: auto, or "
                        "attention=NAME,gdn=NAME (qwenjax generate's --attention-kernel and "
                        "--gdn-kernel)")  # fmt: skip
    p.add_argument("--bandwidth", type=float, default=None, help="GB/s for the roofline")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    results = run(args)
    if args.out:
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        with open(args.out, "a") as f:
            for row in results:
                f.write(json.dumps({"date": stamp, **row}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
