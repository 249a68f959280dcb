"""The serving scheduler's decode loop without HTTP: tokens/s, overlapped against serial.

    python -m benchmarks.scheduler_loop                       # tiny model, a CPU run
    python -m benchmarks.scheduler_loop --model qwen3.6-27b --dtype bfloat16 --slots 32 \\
        --max-length 2048 --prompt-len 512 --new-tokens 128 --out results.jsonl

A script, not a test. Each round submits `--slots` greedy requests of `--prompt-len` random
tokens and `--new-tokens` new ones to a running `Scheduler` and waits for all of them. Rounds
alternate between two loops over the same compiled programs:

    overlap   the server's loop: the read of the tokens made so far is queued before the next
              decode step, and they are published while that step runs
    serial    the loop before that: decode, wait for it, read, publish, then queue the next step

Reported per loop: tokens/s and each stream's ms per token (median of `--repeats` rounds after
one warm-up round each), and the overlap's speed-up over serial. The difference is the host's work
per step (reading, events, finished slots, the dispatch) that the overlap hides behind the
device's.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import add_scheduler_args, utc_stamp, write_results
from qwenjax.api import build
from qwenjax.config import ModelConfig
from qwenjax.inference.sampling import SamplingParams
from qwenjax.serve.scheduler import Scheduler


class SerialScheduler(Scheduler):
    """The baseline: every decode step is waited for and published before the next is queued."""

    def _decode_and_publish(self) -> None:
        if self._decoding():
            constrained = any(s.constraint is not None for s in self._active.values())
            self._decode_step(plain=self.k > 0 and constrained)
        self._publish()


def _host() -> str:
    """The host CPU: on a CPU run it is the device too."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        name = platform.machine()
    return f"{name}, {os.cpu_count()} CPUs"


def _round(scheduler: Scheduler, prompts: list[list[int]], params: SamplingParams) -> tuple:
    """(seconds, tokens made) for one batch of requests."""
    t0 = time.perf_counter()
    handles = [scheduler.submit(p, params) for p in prompts]
    tokens = sum(len(e.token_ids) for h in handles for e in h)
    return time.perf_counter() - t0, tokens


def run(args: argparse.Namespace) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    config = ModelConfig.from_preset(args.model)
    model = jax.jit(lambda: build(config, dtype=dtype, param_dtype=dtype, seed=0))()
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    kw = dict(
        slots=args.slots,
        max_length=args.max_length,
        prefill_chunk=args.prefill_chunk,
        num_speculative_tokens=args.speculative_tokens,
    )
    loops = {"overlap": Scheduler(model, **kw), "serial": SerialScheduler(model, **kw)}
    times: dict[str, list[tuple]] = {name: [] for name in loops}
    for s in loops.values():
        s.start()
    try:
        for i in range(args.repeats + 1):  # round 0 compiles and warms up
            for name, scheduler in loops.items():
                prompts = rng.integers(0, config.vocab_size, (args.slots, args.prompt_len))
                result = _round(scheduler, prompts.tolist(), params)
                if i:
                    times[name].append(result)
    finally:
        for s in loops.values():
            s.stop(drain=False)
    rows = []
    for name, rounds in times.items():
        seconds = statistics.median(r[0] for r in rounds)
        tokens = rounds[0][1]
        rows.append(
            {
                "loop": name,
                "model": args.model,
                "dtype": args.dtype,
                "device": jax.devices()[0].device_kind,
                "slots": args.slots,
                "max_length": args.max_length,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "speculative_tokens": args.speculative_tokens,
                "seconds": seconds,
                "tok_s": tokens / seconds,
                "ms_per_token": 1e3 * seconds / args.new_tokens,  # each stream's pace
                "repeats": args.repeats,
            }
        )
    serial = next(r for r in rows if r["loop"] == "serial")
    for r in rows:
        r["speedup_vs_serial"] = r["tok_s"] / serial["tok_s"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| loop | device | model | slots | max length | tok/s | ms/token a stream | vs serial |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['loop']} | {r['device']} | {r['model']} {r['dtype']} | {r['slots']} | "
        f"{r['max_length']} | {r['tok_s']:.1f} | {r['ms_per_token']:.2f} | "
        f"{r['speedup_vs_serial']:.3f}x |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_scheduler_args(p, slots=32, max_length=512)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--speculative-tokens", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="a directory for the results (.jsonl and .md)")
    args = p.parse_args(argv)
    rows = run(args)
    if args.out:
        meta = {
            "date": utc_stamp(),
            "host": _host(),
            **vars(args),
        }
        write_results(
            args.out,
            f"scheduler_loop_{args.model}_{args.slots}x{args.max_length}",
            utc_stamp(),
            rows,
            meta=meta,
            table=table(rows),
        )
    else:
        print(table(rows))


if __name__ == "__main__":
    main()
