"""Ahead-of-time TPU and H100 compiles from this CPU host (the kernel tests, `qwenjax plan`).

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
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

needs_libtpu = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="libtpu (jax[tpu]) only exists for Linux x86-64",
)
needs_cuda_plugin = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="the CUDA plugin (jax-cuda12-plugin) only exists for Linux x86-64",
)


def aot_env() -> dict[str, str]:
    """This process's environment for a child that compiles for a TPU topology."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }


def cuda_plugin_path() -> str:
    """A directory with this jaxlib's CUDA plugin (jax-cuda12-plugin and -pjrt, no CUDA
    libraries), pip-installed there on first use. On a child's PYTHONPATH it lets XLA compile
    for a GPU on this host (`qwenjax.kernels.gpu_target`). It stays out of the environment's
    site-packages: there the plugin would look for a GPU, and log that it found none, at every
    JAX start of every process."""
    import jax

    version = jax.__version__
    root = Path(__file__).resolve().parents[1] / ".cuda-plugin" / version
    if not (root / "jax_plugins" / "xla_cuda12").is_dir():
        staging = Path(tempfile.mkdtemp(prefix="cuda-plugin-", dir=root.parent.parent))
        packages = [f"jax-cuda12-plugin=={version}", f"jax-cuda12-pjrt=={version}"]
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target"]
        run = subprocess.run([*pip, str(staging), *packages], capture_output=True, text=True)
        if run.returncode:
            shutil.rmtree(staging, ignore_errors=True)
            pytest.fail(f"could not install the CUDA plugin ({' '.join(packages)}):\n{run.stderr}")
        root.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(root)  # whole or absent: an interrupted install is never taken as done
    return str(root)


def compile_report(script: str, *argv, pythonpath: str | None = None) -> dict:
    """Runs `script argv...` and returns the JSON object its last stdout line prints;
    `pythonpath` goes before the child's PYTHONPATH."""
    env = aot_env()
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-c", script, *map(str, argv)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(argv[0], json.dumps(report, indent=1))
    return report
