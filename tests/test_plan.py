"""`qwenjax plan`: the full-size 27B train step compiled for a TPU v5p topology, on this CPU."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwenjax.config import ModelConfig
from qwenjax.plan import CHIPS, _bytes_per_device, hints, print_report, temporaries_refused
from tests.tpu_aot import aot_env, compile_report, needs_libtpu

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


# Runs the plan and then records its exit code in a file, so that any pytest process (an xdist
# worker other than the one that started it) can wait for the result.
_RECORD_EXIT = (
    "import os, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1] + '.tmp', 'w').write(str(rc)); os.replace(sys.argv[1] + '.tmp', sys.argv[1])"
)


class PlanRun:
    """The 27B plan as a subprocess, started when the test is collected (see conftest.py).

    Its compile takes minutes and mostly one core, so it overlaps with the rest of the suite
    instead of adding to it; the test waits for it. `start=False` only points at a run that
    another process (the first xdist worker) started in `directory`.
    """

    def __init__(self, directory: Path, start: bool = True):
        self.out = directory / "plan.json"
        self.log = directory / "plan.log"
        self.exit_code = directory / "plan.rc"
        self.process = None
        if not start:
            return
        directory.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "qwenjax.cli", "plan",
            "--config", str(ROOT / "configs" / "sft_27b_v5p.yaml"),
            "--model", "qwen3.6-27b", "--topology", "v5p-16", "--json", str(self.out),
            "data.seq_len=2048", "data.batch_size=8",
        ]  # fmt: skip
        # Other tests compile for TPU at the same time: libtpu must not lock them out.
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _RECORD_EXIT, str(self.exit_code), *cmd],
                env=aot_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so `kill` reaches the plan under the wrapper
            )

    def wait(self, timeout: float = 1800) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while not self.exit_code.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"qwenjax plan did not finish in {timeout:.0f} s: {self.log}")
            time.sleep(1.0)
        return int(self.exit_code.read_text()), self.log.read_text()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.running():
            os.killpg(self.process.pid, signal.SIGKILL)


@needs_libtpu
def test_plan_27b_full_finetune_fits_v5p(plan_27b):
    # v5p-16 = 8 chips on 2 hosts: the smallest v5p slice where fp32 master weights and Adam
    # moments of 27B parameters (16 bytes each) fit. 16 × 2048 tokens per step, full remat.
    code, log = plan_27b.wait()
    stdout = "\n".join(line for line in log.splitlines() if not line.startswith(("E0000", "W0000")))
    assert code == 0, log[-4000:]
    out = plan_27b.out
    print(stdout)
    report = json.loads(out.read_text())

    assert report["topology"] == "v5p:2x2x2" and report["chips"] == 8
    assert report["mesh"]["fsdp"] == 8
    # The compiled program's footprint, not an estimate of ours, is held against HBM.
    assert report["hbm_per_chip"] == CHIPS["v5p"].hbm_bytes == 95 * GiB
    assert report["fits"] and report["total_per_chip"] <= report["hbm_per_chip"]
    # fp32 parameters (trunk + MTP) split 8 ways; AdamW keeps two fp32 moments of each.
    n = ModelConfig.from_preset("qwen3.6-27b").param_count(include_mtp=True)
    assert report["params_per_chip"] == pytest.approx(4 * n / 8, rel=1e-3)
    assert report["optimizer_per_chip"] == pytest.approx(2 * report["params_per_chip"], rel=1e-3)
    # Temporaries are real (activations, gathered weights) but leave the rest of HBM free.
    assert 1 * GiB < report["temporaries_per_chip"] < report["hbm_per_chip"]
    assert "fits" in stdout and "per chip" in stdout


def test_out_of_hbm_compile_error_is_the_answer_does_not_fit():
    # libtpu's words when temporaries alone exceed HBM (seen from `qwenjax plan` at 262K tokens
    # before the blockwise attention's residuals were fixed): plan reports, it does not crash.
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (523.79G) exceeds available HBM (95.74G)."
    )
    assert temporaries_refused(message) == int(523.79 * GiB)
    assert temporaries_refused("INTERNAL: Mosaic failed to compile TPU kernel") is None


def test_state_bytes_per_chip_count_prng_keys():
    """The does-not-fit path sizes the train state itself; it holds PRNG keys, which are not
    NumPy dtypes (it crashed on them at 262K tokens on a v5p-32)."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    rows = NamedSharding(mesh, PartitionSpec("x"))
    state = {
        "w": jax.ShapeDtypeStruct((16, 3), np.float32, sharding=rows),  # 2 x 3 x 4 bytes a chip
        "rng": jax.ShapeDtypeStruct((8,), jax.random.key(0).dtype, sharding=rows),  # 1 x 8
    }
    assert _bytes_per_device(state) == 2 * 3 * 4 + 8


def test_a_step_that_does_not_fit_gets_hints():
    """The report of a run over HBM names the config keys that cut memory, with their values."""
    report = {
        "topology": "v5p:2x2x4", "chips": 16, "hosts": 4, "mesh": {"sequence": 16},
        "hbm_per_chip": 95 * GiB, "params_per_chip": 6 * GiB, "optimizer_per_chip": 12 * GiB,
        "temporaries_per_chip": 95 * GiB, "total_per_chip": 113 * GiB, "fits": False,
        "tokens_per_step": 2**20, "flops_per_step": 3e17, "step_seconds_at_peak": 44.0,
        "compile_seconds": 300.0, "remat": "full", "grad_accum": 2, "global_batch": 4,
        "host_batch": 4, "kernels": {"gated_delta_rule": "auto", "attention": "auto"},
    }  # fmt: skip
    out = io.StringIO()
    print_report(report, out)
    text = out.getvalue()
    assert "DOES NOT FIT" in text and "to fit, try:" in text
    assert "model.remat=layers (now full)" in text
    assert "train.grad_accum up to data.batch_size 4, a divisor of it (now 2)" in text
    assert "kernels.gated_delta_rule=pallas_tpu (now auto)" in text
    assert "kernels: gated delta rule auto, attention auto" in text
    assert "model.remat=full" not in text
    loose = hints({**report, "remat": "none"})
    assert loose[0] == "model.remat=full (now none): keeps only each block's input"
    assert loose[1].startswith("kernels.gated_delta_rule=pallas_tpu (now auto)")
    assert loose[2].startswith("model.remat=layers (now none)")
    pallas = {"gated_delta_rule": "pallas_tpu", "attention": "auto"}
    tight = {**report, "remat": "layers", "grad_accum": 4, "kernels": pallas}
    assert [h.split()[0] for h in hints(tight)] == ["a"]  # only more chips is left
    out = io.StringIO()
    print_report({**report, "fits": True, "total_per_chip": 90 * GiB}, out)
    assert "to fit" not in out.getvalue()


# In a fresh process (tests/tpu_aot.py): the tiny model's train step compiled for 4 v5p chips,
# context parallel, counting the calls that reach the Pallas TPU gated delta rule.
_KERNELS_SCRIPT = """
import json, sys
from qwenjax.kernels.gated_delta_rule import api
from qwenjax.plan import plan
from qwenjax.runconfig import load_run_config

calls = []
pallas = api._BACKENDS["pallas_tpu"]
api._BACKENDS["pallas_tpu"] = lambda *a, **kw: calls.append(a[2].shape) or pallas(*a, **kw)
overrides = ["data.seq_len=256", "data.batch_size=2", "mesh.fsdp=2", "mesh.sequence=2"]
report = plan(load_run_config(sys.argv[1], [*overrides, *sys.argv[2:]]), "v5p:2x2x1")
print(json.dumps({"v": [list(s) for s in calls], "fits": report["fits"],
                  "kernels": report["kernels"]}))
"""


@needs_libtpu
def test_run_config_pins_the_pallas_tpu_gated_delta_rule():
    """`kernels.gated_delta_rule=pallas_tpu` reaches every GDN layer of the step, and its Mosaic
    kernels compile on a multi-chip mesh under context parallelism (each chip's 128 of the 256
    tokens, with the state's dk columns appended to v's dv)."""
    config = ROOT / "configs" / "tiny-demo.yaml"
    tiny = ModelConfig.from_preset("tiny")
    run = compile_report(_KERNELS_SCRIPT, config, "kernels.gated_delta_rule=pallas_tpu")
    assert run["fits"] and run["kernels"]["gated_delta_rule"] == "pallas_tpu"
    assert len(run["v"]) >= tiny.block_pattern.count("linear_attention")
    width = tiny.linear_value_head_dim + tiny.linear_key_head_dim
    assert {tuple(v[1:]) for v in run["v"]} == {(128, tiny.linear_num_value_heads, width)}
