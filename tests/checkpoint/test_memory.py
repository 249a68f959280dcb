"""Conversion streams: peak memory follows the largest parameter, not the checkpoint size.

Each operation runs in a fresh process that reports its peak RSS above its RSS after imports.
The synthetic checkpoint is ~20× its largest (stacked) parameter, so an implementation that
held the model would fail by a wide margin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from qwenjax.api import build
from qwenjax.config import FULL_ATTENTION, LINEAR_ATTENTION, ModelConfig
from qwenjax.testing.hf_checkpoint import write_random_hf_checkpoint

REPO = Path(__file__).resolve().parents[2]
CONFIG = ModelConfig(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=32,  # 8 scanned blocks: a stacked MLP weight is 8 × 4 MB
    layer_types=((LINEAR_ATTENTION,) * 3 + (FULL_ATTENTION,)) * 8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=128,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    mrope_section=(8, 4, 4),
    mtp_num_hidden_layers=1,
)


def run(*args: str) -> int:
    """Peak RSS increase (bytes) of `python -m tests.checkpoint.worker ARGS`."""
    # Tens-of-MB buffers sit below glibc's dynamic mmap threshold (it rises to 32 MiB), so they
    # come from the heap, whose fragmentation inflates RSS; real leaves (GBs) are always
    # mmapped and returned on free. A fixed threshold makes this small test behave like that.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    cmd = [sys.executable, "-m", "tests.checkpoint.worker", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["peak"] - report["baseline"]


@pytest.fixture(scope="module")
def peaks(tmp_path_factory):
    """Peak RSS increases of import, export and load, plus the sizes they are judged by."""
    root = tmp_path_factory.mktemp("memory")
    specs = write_random_hf_checkpoint(root / "hf", CONFIG, max_shard_size="50MB")
    total = sum(s.nbytes for s in specs)
    state = nnx.state(build(CONFIG, abstract=True), nnx.Param)
    largest = max(v.get_value().size * 4 for _, v in nnx.to_flat_state(state))  # float32
    assert total > 15 * largest  # the gap that makes the test meaningful
    out = {
        "import": run("import", str(root / "hf"), str(root / "ours")),
        "export": run("export", str(root / "ours"), str(root / "back")),
        "load": run("load", str(root / "ours")),
    }
    mb = {k: round(v / 1e6) for k, v in out.items()}
    print(f"\ncheckpoint {total / 1e6:.0f} MB, largest parameter {largest / 1e6:.1f} MB, {mb}")
    return out, largest, total


@pytest.mark.parametrize("op", ["import", "export"])
def test_conversion_memory_is_bounded_by_the_largest_parameter(peaks, op):
    increase, largest, total = peaks[0][op], peaks[1], peaks[2]
    assert increase <= 4 * largest, f"{op}: {increase / 1e6:.0f} MB > 4 × {largest / 1e6:.0f} MB"
    assert increase < total / 4


def test_load_holds_the_model_plus_a_few_parameters(peaks):
    """`load` keeps the model, but no second copy. (`load` of a HF directory uses the import's
    reader, measured above.)"""
    increase, largest, total = peaks[0]["load"], peaks[1], peaks[2]
    assert increase <= total + 4 * largest, f"{increase / 1e6:.0f} MB for {total / 1e6:.0f} MB"
