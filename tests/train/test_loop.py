"""The fine-tuning loop end to end in subprocesses: resume after SIGTERM, resume on another mesh.

Each run is `python -m qwenjax.cli train` on the tiny model with 8 fake CPU devices, logging the
loss every step to `metrics.jsonl`, which is what the trajectories are compared on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwenjax.runconfig import RunConfigError, load_run_config
from qwenjax.testing.tiny_data import save_tiny_tokenizer, write_sort_task

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
STEPS = 10


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_run_config_parses(path):
    cfg = load_run_config(path)
    assert cfg.train.steps > 0


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIGS[0].read_text() + "\ntrain_steps: 3\n")
    with pytest.raises(RunConfigError, match=r"bad\.yaml.*train_steps"):
        load_run_config(bad)
    with pytest.raises(RunConfigError, match=r"optim\.lr: expected float"):
        load_run_config(CONFIGS[0], ["optim.lr=fast"])


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    train_path, eval_path = write_sort_task(root / "data", n_train=400, n_eval=8)
    return train_path, eval_path, save_tiny_tokenizer(root / "tokenizer")


def run_train(task, run_dir: Path, *overrides: str, stop_after: int | None = None) -> list[dict]:
    """Train in a subprocess; with `stop_after`, send SIGTERM once that many steps are logged."""
    train_path, _, tokenizer = task
    args = [
        sys.executable, "-m", "qwenjax.cli", "train", "--config", str(CONFIGS_BY_NAME["tiny-demo"]),
        f"run_dir={run_dir}", f"data.paths={train_path}", f"train.tokenizer={tokenizer}",
        "train.eval_data=null", "train.export_hf=false",
        f"train.steps={STEPS}", f"optim.total_steps={STEPS}", "optim.warmup_steps=2",
        "train.log_every=1", "data.seq_len=64", "data.batch_size=8", "checkpoint.every_steps=3",
        *overrides,
    ]  # fmt: skip
    # A shared compilation cache: the later runs reuse the first run's compiled programs.
    cache = run_dir.parent / "jax_cache"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = run_dir / "metrics.jsonl"
    if stop_after is not None:
        while proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= stop_after:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()[-3000:]
    return [json.loads(line) for line in metrics.read_text().splitlines()]


CONFIGS_BY_NAME = {p.stem: p for p in CONFIGS}


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_sigterm_then_resume_matches_an_uninterrupted_run(task, tmp_path):
    straight = losses(run_train(task, tmp_path / "straight", "mesh.fsdp=-1"))
    assert sorted(straight) == list(range(1, STEPS + 1))

    interrupted = tmp_path / "interrupted"
    first = losses(run_train(task, interrupted, "mesh.fsdp=-1", stop_after=4))
    assert len(first) < STEPS, "the run was not stopped early"
    saved = interrupted / "checkpoints"
    on_other_mesh = tmp_path / "other_mesh"
    shutil.copytree(interrupted, on_other_mesh)

    resumed = losses(run_train(task, interrupted, "mesh.fsdp=-1"))
    assert resumed.keys() == straight.keys()  # steps before the stop are kept in the log
    for step, loss in resumed.items():
        assert abs(loss - straight[step]) <= 1e-6 * abs(straight[step]), step

    # The same checkpoint restored on a different mesh (data 2 × fsdp 2 × tensor 2).
    other = losses(
        run_train(
            task,
            on_other_mesh,
            "mesh.data=2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
            "model.rules=fsdp_tp",
        )
    )
    for step, loss in other.items():
        assert abs(loss - straight[step]) <= 1e-4 * abs(straight[step]), step
    assert saved.exists()
