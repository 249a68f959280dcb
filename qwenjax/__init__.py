"""qwenjax: the Qwen3.6 / Qwen3.5 hybrid models in JAX.

Public API:
    ModelConfig                       model hyper-parameters, presets, `from_hf`
    build(config, dtype=..., abstract=False)  a randomly initialised (or shape-only) model
    load(path, dtype=None)            a model from a Hugging Face or qwenjax checkpoint directory
    param_count(model)                number of parameters of a (possibly abstract) model
    model(input_ids)                  logits [B, T, vocab]
    generate(model, input_ids, max_new_tokens, ...)  new token ids [B, N] (see qwenjax.inference)
"""

from qwenjax.api import build, param_count
from qwenjax.checkpoint import load
from qwenjax.config import ModelConfig
from qwenjax.inference import generate

__all__ = ["ModelConfig", "build", "generate", "load", "param_count"]
