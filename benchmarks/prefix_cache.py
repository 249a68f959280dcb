"""Prefix reuse in the serving scheduler: time to first token of a multi-turn conversation, with
the prefix cache and without it, in one run.

    python -m benchmarks.prefix_cache                                    # tiny model, a CPU run
    python -m benchmarks.prefix_cache --model qwen3.6-27b --dtype bfloat16 --system 8192 \\
        --max-length 16384 --out benchmarks/results

A script, not a test. A conversation is a system prompt of `--system` random tokens, then
`--turns` turns of `--user` tokens each, every one ending in a generation header that starts
with the boundary token (the server's `<|im_start|>`). Each turn's prompt re-sends the whole
history:

    tools   the reply as the model wrote it (a tool loop, or a template that keeps it): the slot's
            live row is reused, only the new turn is prefilled
    chat    the reply re-rendered differently (Qwen3.6 drops earlier turns' reasoning): the
            snapshot taken at the last turn's header is reused, the reply and the new turn are
            prefilled

and `--turns` users (at most `--slots`) who start conversations with one system prompt:

    users   each user's first prompt is sent once the previous user's first token is out (that
            reply still running): the snapshot taken where the system prompt ends is copied from
            the previous user's slot, only the user turn is prefilled
    burst   the users' prompts are sent at once (an agent's parallel sub-agents): prefills run
            oldest first, and each later one copies the first one's system snapshot

Two schedulers over the same weights run the same conversations, one with `prefix_cache=False`.
Reported per kind and scheduler: the median time to first token of each turn over `--repeats`
conversations (after one that compiles), the prompt tokens prefilled, and the speed-up of the
last turn, whose history is the longest (of users: the last user's).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import add_scheduler_args, utc_stamp, write_results
from benchmarks.scheduler_loop import _host
from qwenjax.api import build
from qwenjax.config import ModelConfig
from qwenjax.inference.sampling import SamplingParams
from qwenjax.serve.scheduler import Scheduler

BOUNDARY = 1  # the generation header's first token; random tokens are drawn above it


def _ttft(scheduler: Scheduler, prompt: list[int], params: SamplingParams) -> tuple:
    """(seconds to the first token, the reply, prompt tokens reused)."""
    t0 = time.perf_counter()
    first, tokens, cached = None, [], 0
    for event in scheduler.submit(prompt, params):
        if first is None and event.token_ids:
            first = time.perf_counter() - t0
        tokens += event.token_ids
        cached = event.cached_tokens
    return first, tokens, cached


def conversation(scheduler, args, rng, kind: str, params) -> list[dict]:
    vocab = scheduler.config.vocab_size
    rnd = lambda n: rng.integers(BOUNDARY + 1, vocab, n).tolist()
    header = [BOUNDARY, *rnd(2)]
    history = rnd(args.system)
    turns = []
    users = min(args.turns, args.slots)  # more would wait for a slot
    if kind in ("users", "burst"):
        prompts = [[*history, BOUNDARY, *rnd(args.user), *header] for _ in range(users)]
        t0 = time.perf_counter()
        running = [iter(scheduler.submit(p, params)) for p in prompts] if kind == "burst" else []
        for i, prompt in enumerate(prompts):
            if kind == "users":  # once the previous user's first token is out
                t0 = time.perf_counter()
                running.append(iter(scheduler.submit(prompt, params)))
            first = next(e for e in running[i] if e.token_ids)
            seconds = time.perf_counter() - t0
            turns.append({"prompt": len(prompt), "cached": first.cached_tokens, "ttft_s": seconds})
        for events in running:  # the replies end
            collections.deque(events, maxlen=0)
        return turns
    for _ in range(args.turns):
        prompt = [*history, BOUNDARY, *rnd(args.user), *header]
        seconds, reply, cached = _ttft(scheduler, prompt, params)
        turns.append({"prompt": len(prompt), "cached": cached, "ttft_s": seconds})
        # The next turn re-sends this one: the reply as written after the header, or an
        # assistant turn of the same length rendered differently.
        if kind == "tools":
            history = [*prompt, *reply]
        else:
            history = [*prompt[: -len(header)], BOUNDARY, *rnd(1 + len(reply))]
    return turns


def run(args: argparse.Namespace) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    config = ModelConfig.from_preset(args.model)
    model = jax.jit(lambda: build(config, dtype=dtype, param_dtype=dtype, seed=0))()
    params = SamplingParams(temperature=0.0, max_tokens=args.reply, ignore_eos=True)
    kw = dict(slots=args.slots, max_length=args.max_length, prefill_chunk=args.prefill_chunk)
    schedulers = {
        "reuse": Scheduler(model, **kw, boundary_token=BOUNDARY),
        "whole": Scheduler(model, **kw, prefix_cache=False),
    }
    results: dict[tuple, list[list[dict]]] = {}
    for s in schedulers.values():
        s.start()
    try:
        for i in range(args.repeats + 1):  # conversation 0 compiles
            for j, kind in enumerate(("tools", "chat", "users", "burst")):
                for name, scheduler in schedulers.items():
                    # The same conversation for both; a system prompt of its own for each kind.
                    rng = np.random.default_rng([i, j])
                    turns = conversation(scheduler, args, rng, kind, params)
                    if i:
                        results.setdefault((kind, name), []).append(turns)
    finally:
        for s in schedulers.values():
            s.stop(drain=False)
    rows = []
    for (kind, name), runs in results.items():
        ttft = [statistics.median(r[t]["ttft_s"] for r in runs) for t in range(len(runs[0]))]
        rows.append(
            {
                "kind": kind,
                "scheduler": name,
                "model": args.model,
                "dtype": args.dtype,
                "device": jax.devices()[0].device_kind,
                "turns": len(runs[0]),
                "prompt_tokens": [t["prompt"] for t in runs[0]],
                "cached_tokens": [t["cached"] for t in runs[0]],
                "ttft_s": ttft,
                "repeats": args.repeats,
            }
        )
    for r in rows:
        whole = next(w for w in rows if w["kind"] == r["kind"] and w["scheduler"] == "whole")
        r["last_turn_speedup"] = whole["ttft_s"][-1] / r["ttft_s"][-1]
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| conversation | scheduler | device | model | last prompt | reused | TTFT each turn (ms) "
        "| last turn vs whole |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['kind']} | {r['scheduler']} | {r['device']} | {r['model']} {r['dtype']} | "
        f"{r['prompt_tokens'][-1]} | {r['cached_tokens'][-1]} | "
        + " ".join(f"{1e3 * t:.0f}" for t in r["ttft_s"])
        + f" | {r['last_turn_speedup']:.2f}x |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_scheduler_args(p, slots=4, max_length=4096)
    p.add_argument("--system", type=int, default=1024, help="system prompt tokens")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--user", type=int, default=128, help="tokens of each user turn")
    p.add_argument("--reply", type=int, default=32, help="tokens of each reply")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="a directory for the results (.jsonl and .md)")
    args = p.parse_args(argv)
    rows = run(args)
    if args.out:
        meta = {"date": utc_stamp(), "host": _host(), **vars(args)}
        name = f"prefix_cache_{args.model}_{args.system}+{args.turns}x{args.user}"
        write_results(args.out, name, utc_stamp(), rows, meta=meta, table=table(rows))
    else:
        print(table(rows))


if __name__ == "__main__":
    main()
