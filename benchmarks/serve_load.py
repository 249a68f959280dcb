"""Load test of a running `qwenjax serve` (or any OpenAI-compatible server).

    qwenjax serve --checkpoint DIR --port 8000 --slots 32 &
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000/v1 --concurrency 1 8 32 \\
        --requests 64 --prompt-len 512 --max-tokens 128 --out results.jsonl

For each concurrency level, `--requests` streaming requests are sent with at most that many in
flight (a closed loop: a new one starts when one ends). Prompts are random token ids on
`/v1/completions` (exact prompt lengths, no tokenizer needed) or random words on
`/v1/chat/completions` (`--route chat`); `ignore_eos` makes every reply `--max-tokens` long, so
levels are comparable. Reported per level:

    req/s          finished requests per second of wall time
    out tok/s      generated tokens (from each stream's usage) per second of wall time
    TTFT           request sent → first generated text (p50 / p90 / p99, ms)
    ITL            gaps between streamed chunks after the first (p50 / p90 / p99, ms); a chunk
                   may hold several tokens with MTP speculation
    TPOT           per request, (end − first token) / (tokens − 1): time per output token (p50)

The server's own view (`/metrics`: speculative acceptance, queue) is scraped before and after
each level when `--api-key` allows it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import statistics
import sys
import time
import urllib.request

import numpy as np
import openai


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _scrape(base_url: str, key: str | None) -> dict[str, float]:
    root = base_url.removesuffix("/").removesuffix("/v1")
    request = urllib.request.Request(root + "/metrics")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


async def _one(client, args, prompt, result: dict) -> None:
    sent = time.perf_counter()
    first = last = None
    gaps, tokens = [], 0
    extra = {"ignore_eos": True} if args.ignore_eos else {}
    common = dict(
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    if args.route == "chat":
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], **common
        )
    else:
        stream = await client.completions.create(prompt=prompt, **common)
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if args.route == "chat":  # reasoning counts as generated text too
            piece = choice.delta.content or getattr(choice.delta, "reasoning_content", None)
        else:
            piece = choice.text
        if not piece:
            continue
        now = time.perf_counter()
        if first is None:
            first = now
        else:
            gaps.append(now - last)
        last = now
    end = time.perf_counter()
    result.update(
        ttft=(first or end) - sent,
        e2e=end - sent,
        gaps=gaps,
        tokens=tokens,
        tpot=(end - first) / (tokens - 1) if first and tokens > 1 else None,
    )


async def _level(args, concurrency: int, prompts: list) -> dict:
    client = openai.AsyncOpenAI(
        base_url=args.base_url, api_key=args.api_key or "none", max_retries=0, timeout=args.timeout
    )
    results: list[dict] = []
    queue = list(prompts)
    errors = 0

    async def worker() -> None:
        nonlocal errors
        while queue:
            prompt = queue.pop()
            result: dict = {}
            try:
                await _one(client, args, prompt, result)
                results.append(result)
            except openai.APIError as e:
                errors += 1
                print(f"  request failed: {e}", file=sys.stderr)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    tokens = sum(r["tokens"] for r in results)
    ms = lambda xs, q: round(1000 * _pct(xs, q), 2)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": errors,
        "wall_s": round(wall, 3),
        "req_per_s": round(len(results) / wall, 3),
        "out_tok_per_s": round(tokens / wall, 1),
        "ttft_ms": {q: ms(ttft, q) for q in (50, 90, 99)},
        "itl_ms": {q: ms(gaps, q) for q in (50, 90, 99)},
        "tpot_ms_p50": ms(tpot, 50),
        "mean_e2e_s": round(statistics.fmean(r["e2e"] for r in results), 3) if results else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--route", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (words for chat)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let replies stop at EOS (lengths then vary)",
    )
    p.add_argument("--vocab", type=int, default=200, help="random prompt ids are in [10, vocab)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent first (compilation)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append one JSON line per level")
    args = p.parse_args()

    if args.model is None:
        client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key or "none")
        args.model = client.models.list().data[0].id
    rng = np.random.default_rng(args.seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda"]

    def prompt():
        if args.route == "chat":
            return " ".join(rng.choice(words, size=args.prompt_len))
        return [int(t) for t in rng.integers(10, args.vocab, size=args.prompt_len)]

    if args.warmup:
        asyncio.run(_level(args, args.warmup, [prompt() for _ in range(args.warmup)]))
    print(f"{args.model} via {args.route}: prompt {args.prompt_len}, max_tokens {args.max_tokens}")
    header = (
        f"{'conc':>5} {'req/s':>8} {'out tok/s':>10} {'TTFT p50/p90/p99 ms':>24} "
        f"{'ITL p50/p90/p99 ms':>24} {'TPOT p50':>9} {'err':>4}"
    )
    print(header)
    for concurrency in args.concurrency:
        before = _scrape(args.base_url, args.api_key)
        row = asyncio.run(_level(args, concurrency, [prompt() for _ in range(args.requests)]))
        after = _scrape(args.base_url, args.api_key)
        drafted = "qwenjax:spec_decode_num_draft_tokens_total"
        accepted = "qwenjax:spec_decode_num_accepted_tokens_total"
        if drafted in after and after[drafted] > before.get(drafted, 0):
            row["spec_acceptance"] = round(
                (after[accepted] - before.get(accepted, 0)) / (after[drafted] - before[drafted]), 3
            )
        t, i = row["ttft_ms"], row["itl_ms"]
        print(
            f"{concurrency:>5} {row['req_per_s']:>8.2f} {row['out_tok_per_s']:>10.1f} "
            f"{t[50]:>8.1f}/{t[90]:.1f}/{t[99]:.1f} {i[50]:>10.1f}/{i[90]:.1f}/{i[99]:.1f} "
            f"{row['tpot_ms_p50']:>9.1f} {row['errors']:>4}",
            flush=True,
        )
        if args.out:
            record = {
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "model": args.model,
                "route": args.route,
                "prompt_len": args.prompt_len,
                "max_tokens": args.max_tokens,
                **row,
            }
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
