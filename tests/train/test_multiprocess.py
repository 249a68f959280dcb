"""Two CPU processes on localhost (launch/local.sh, jax.distributed + gloo) train like one.

With shuffling and packing off, the two hosts' shares of a global batch hold the same rows as the
single process's batch (in another order), so every step's loss must be the same. With the token
axis split over the two processes (context parallelism across hosts, as at 262K), both hosts read
the same rows and each device takes its half of every row's tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from qwenjax.testing.tiny_data import save_tiny_tokenizer, write_sort_task

ROOT = Path(__file__).parents[2]
STEPS = 3


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines]


def test_two_processes_match_one(tmp_path):
    train_path, _ = write_sort_task(tmp_path / "data", n_train=200, n_eval=4)
    tokenizer = save_tiny_tokenizer(tmp_path / "tok")
    common = [
        f"data.paths={train_path}", f"train.tokenizer={tokenizer}", "train.eval_data=null",
        "train.export_hf=false", f"train.steps={STEPS}", f"optim.total_steps={STEPS}",
        "optim.warmup_steps=1", "train.log_every=1", "data.seq_len=64", "data.shuffle=false",
        "data.pack=false", "checkpoint.every_steps=100",
    ]  # fmt: skip
    qwenjax = shutil.which("qwenjax") or str(Path(os.sys.executable).parent / "qwenjax")
    env = dict(
        os.environ,
        PATH=f"{Path(qwenjax).parent}:{os.environ['PATH']}",
        XLA_FLAGS="--xla_backend_optimization_level=0",  # one CPU device per process
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
    )
    config = str(ROOT / "configs" / "tiny-demo.yaml")
    one = tmp_path / "one"
    subprocess.run(
        [qwenjax, "train", "--config", config, f"run_dir={one}", "data.batch_size=8", *common],
        env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    two = tmp_path / "two"
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / "local.sh"), "2", config, f"run_dir={two}",
         "data.batch_size=4", *common],
        env=env, capture_output=True, timeout=600, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    seq = tmp_path / "sequence"
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / "local.sh"), "2", config, f"run_dir={seq}",
         "data.batch_size=8", "mesh.fsdp=1", "mesh.sequence=-1", *common],
        env=env, capture_output=True, timeout=600, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    single, double, split = _losses(one), _losses(two), _losses(seq)
    assert len(single) == len(double) == len(split) == STEPS
    for a, b, c in zip(single, double, split, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)
        assert abs(a - c) <= 1e-5 * abs(a)
