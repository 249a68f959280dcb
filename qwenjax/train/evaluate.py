"""Held-out evaluation during and after training: exact match of greedy chat completions.

Completions come from the inference engine (cached prefill + on-device decode loop), optionally
with MTP speculative decoding, whose acceptance rate then says how well the MTP head learned.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qwenjax import chat
from qwenjax.inference.engine import Engine
from qwenjax.inference.sampling import SamplingParams
from qwenjax.model import Qwen35
from qwenjax.tokenizer import Tokenizer


def chat_exact_match(
    model: Qwen35,
    tokenizer: Tokenizer,
    records: Sequence[dict],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 256,
    samples: int = 3,
    speculative_tokens: int = 0,
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
    engine = Engine(model)
    generated, drafted, accepted = [], 0, 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        out = engine.decode(
            batch,
            [SamplingParams(temperature=0.0)] * len(batch),
            max_new_tokens=max_new_tokens,
            stop_token_ids=tokenizer.eos_token_ids,
            pad_id=tokenizer.pad_id,
            num_speculative_tokens=speculative_tokens,
        )
        for row, n, why in zip(out.tokens, out.lengths, out.finish_reasons, strict=True):
            generated.append(tokenizer.decode(row[: n - (why == "stop")].tolist()).strip())
        drafted, accepted = drafted + out.drafted, accepted + out.accepted
    hits = [g == e for g, e in zip(generated, expected, strict=True)]
    examples = [
        {"prompt": r["messages"][-2]["content"], "expected": e, "generated": g}
        for r, e, g in list(zip(records, expected, generated, strict=True))[:samples]
    ]
    result = {"exact_match": float(np.mean(hits)), "n": len(hits), "examples": examples}
    if speculative_tokens:
        result["mtp_acceptance_rate"] = accepted / drafted if drafted else None
    return result


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
