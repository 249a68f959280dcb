"""Random HF-layout checkpoints of any size, written one tensor at a time (no torch needed).

Used where a transformers model would be too slow to build, e.g. the memory tests, which need
a checkpoint of hundreds of MB whose largest tensor is small.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flax import nnx

from qwenjax.api import build
from qwenjax.checkpoint.hf_io import ShardedWriter, TensorSpec
from qwenjax.checkpoint.hf_keys import TEXT_PREFIX, table
from qwenjax.config import ModelConfig


def write_random_hf_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    *,
    dtype: np.dtype = np.float32,
    prefix: str = TEXT_PREFIX,
    max_shard_size: int | str = "50MB",
    seed: int = 0,
) -> list[TensorSpec]:
    """Write `config.json` and N(0, 0.02²) tensors for every HF key of `config` into `path`.

    Returns:
      The tensors written (key, dtype, shape), in file order.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
    state = nnx.state(build(config, abstract=True), nnx.Param)
    shapes = {tuple(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state)}
    specs = [
        TensorSpec(key, np.dtype(dtype), e.hf_shape)
        for e in table(shapes, config, prefix)
        for key in e.hf_keys
    ]
    writer = ShardedWriter(path, specs, max_shard_size)
    rng = np.random.default_rng(seed)
    for s in specs:
        writer.write(s.key, (0.02 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype))
    writer.close()
    return specs
