"""Held-out evaluation during and after training: exact match of greedy chat completions.

Completion here recomputes the whole (short) window every token inside one jitted
`lax.fori_loop`; it needs no cache, which suits short evaluation prompts. Prompts are left-padded
into a pad segment of their own, so padding never leaks into a row (the model's segment ids
restart the GDN state and positions at the first real token).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax import chat
from qwenjax.model import Qwen35
from qwenjax.tokenizer import Tokenizer


@nnx.jit(static_argnames=("max_new_tokens",))
def _greedy(model: Qwen35, tokens: jax.Array, segments: jax.Array, max_new_tokens: int):
    start = tokens.shape[1] - max_new_tokens  # [B, P + N] with the last N to fill

    def body(t, tokens):
        logits = model(tokens, segment_ids=segments)  # [B, P + N, V]; causal, so t−1 is final
        next_token = jnp.argmax(logits[:, t - 1], axis=-1).astype(tokens.dtype)
        return tokens.at[:, t].set(next_token)

    return jax.lax.fori_loop(start, tokens.shape[1], body, tokens)


def greedy_complete(
    model: Qwen35, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int
) -> np.ndarray:
    """Greedy continuation `[N, max_new_tokens]` of each prompt (ids), batched."""
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width + max_new_tokens), pad_id, np.int32)
    segments = np.ones_like(tokens)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) : width] = p
        segments[i, : width - len(p)] = 0  # left padding: a segment of its own
    out = _greedy(model, jnp.asarray(tokens), jnp.asarray(segments), max_new_tokens)
    return np.asarray(out[:, width:])


def chat_exact_match(
    model: Qwen35,
    tokenizer: Tokenizer,
    records: Sequence[dict],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 256,
    samples: int = 3,
) -> dict:
    """Exact match of the final assistant reply of each chat record (thinking off).

    Returns `{"exact_match", "n", "examples": [{prompt, expected, generated}, ...]}`.
    """
    prompts, expected = [], []
    for r in records:
        messages = r["messages"]
        text = chat.render(messages[:-1], add_generation_prompt=True, enable_thinking=False)
        prompts.append(tokenizer.encode(text))
        expected.append(messages[-1]["content"])
    stops = set(tokenizer.eos_token_ids)
    generated = []
    for i in range(0, len(prompts), batch_size):
        batch = greedy_complete(
            model, prompts[i : i + batch_size], max_new_tokens, tokenizer.pad_id
        )
        for row in batch.tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            generated.append(tokenizer.decode(row[:cut]).strip())
    hits = [g == e for g, e in zip(generated, expected, strict=True)]
    examples = [
        {"prompt": r["messages"][-2]["content"], "expected": e, "generated": g}
        for r, e, g in list(zip(records, expected, generated, strict=True))[:samples]
    ]
    return {"exact_match": float(np.mean(hits)), "n": len(hits), "examples": examples}


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
