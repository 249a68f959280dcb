"""Ahead-of-time TPU (and H100) compiles from this CPU host (the kernel tests, `qwenjax plan`).

A script runs in a fresh process with `JAX_PLATFORMS=cpu`: the TPU topology comes from libtpu
(`jax.experimental.topologies`), and lowering for it makes `lax.platform_dependent` pick the
Mosaic branches. ALLOW_MULTIPLE_LIBTPU_LOAD: other processes (e.g. `qwenjax plan`) may hold
libtpu's lockfile, and compiling for a described topology touches no TPU. XLA_FLAGS: conftest.py's
CPU test flags (optimisation level 0) must not reach the TPU compiler.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

needs_libtpu = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="libtpu (jax[tpu]) only exists for Linux x86-64",
)
needs_cuda_plugin = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="the CUDA plugin (jax[cuda12-local]) only exists for Linux x86-64",
)


def aot_env() -> dict[str, str]:
    """This process's environment for a child that compiles for a TPU topology."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }


def compile_report(script: str, *argv) -> dict:
    """Runs `script argv...` and returns the JSON object its last stdout line prints."""
    env = aot_env()
    cmd = [sys.executable, "-c", script, *map(str, argv)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(argv[0], json.dumps(report, indent=1))
    return report
