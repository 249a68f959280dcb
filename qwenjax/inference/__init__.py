"""Inference: the decoding engine, sampling and the text layer.

generate(model, input_ids, max_new_tokens, temperature=0.0, ...)   new ids [B, N] (numpy)
Engine(model, mesh=None).decode(prompts, params, max_new_tokens=...)   per-request options,
    logprobs, finish reasons, MTP acceptance; `start` / `step` / `finish` to stream
SamplingParams                      one request's options (OpenAI names and ranges)
complete / stream (text.py)         text in, text out, with stop strings
"""

from qwenjax.inference.engine import Engine, Generation, generate
from qwenjax.inference.sampling import SamplingParams

__all__ = ["Engine", "Generation", "SamplingParams", "generate"]
