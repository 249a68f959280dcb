"""The embedded default job: the whole checkpoint + model pipeline on the tiny preset, on CPU.

build → save as Hugging Face safetensors → convert to qwenjax (orbax) → load both → forward →
export back to Hugging Face → check the round trip is bit-exact. Each step prints what it did.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.api import build, param_count
from qwenjax.checkpoint.convert import hf_to_qwenjax, load, qwenjax_to_hf, save_hf
from qwenjax.checkpoint.hf_io import SafetensorsReader, read_tensor
from qwenjax.config import ModelConfig


def _step(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)


def _same_tensors(a: Path, b: Path) -> int:
    ra, rb = SafetensorsReader(a), SafetensorsReader(b)
    if set(ra.tensors) != set(rb.tensors):
        raise AssertionError(f"key sets differ: {set(ra.tensors) ^ set(rb.tensors)}")
    for key in ra.tensors:
        if read_tensor(ra.tensors[key]).tobytes() != read_tensor(rb.tensors[key]).tobytes():
            raise AssertionError(f"{key} differs after the round trip")
    return len(ra.tensors)


def run_demo(run_dir: str | Path, *, seed: int = 0) -> dict:
    """Run the pipeline in `run_dir` (recreated) and return a summary dict."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = ModelConfig.from_preset("tiny")

    model = build(config, seed=seed)
    n = param_count(model)
    layers = f"{config.num_hidden_layers} layers as {config.num_blocks} scanned blocks"
    _step(f"built tiny model: {layers} of {list(config.block_pattern)}, {n:,} parameters", start)

    hf_dir = save_hf(model, run_dir / "hf", max_shard_size="200KB")
    _step(f"saved Hugging Face checkpoint: {hf_dir}", start)

    ours_dir = hf_to_qwenjax(hf_dir, run_dir / "qwenjax", progress=False)
    _step(f"converted to qwenjax (orbax): {ours_dir}", start)

    ids = jax.random.randint(jax.random.key(seed), (2, 77), 0, config.vocab_size)
    forward = nnx.jit(lambda m, x: m(x))
    expected = np.asarray(forward(model, ids))
    diffs = {}
    for name, path in (("HF", hf_dir), ("qwenjax", ours_dir)):
        logits = np.asarray(forward(load(path, dtype=jnp.float32), ids))
        diffs[name] = float(np.abs(logits - expected).max())
        _step(f"loaded the {name} checkpoint, forward {tuple(ids.shape)} → logits "
              f"{logits.shape}, max |Δ| vs the built model {diffs[name]:.1e}", start)  # fmt: skip

    back = qwenjax_to_hf(ours_dir, run_dir / "hf_roundtrip", max_shard_size="200KB", progress=False)
    count = _same_tensors(hf_dir, back)
    _step(f"exported back to Hugging Face: {back}; {count} tensors bit-exact", start)
    if max(diffs.values()) != 0.0:
        raise AssertionError(f"loaded checkpoints changed the logits: {diffs}")
    summary = {"params": n, "tensors": count, "max_abs_diff": diffs, "seconds": 0.0}
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(f"demo OK in {summary['seconds']}s")
    return summary
