"""Shared fixtures: tiny random transformers checkpoints, saved once per session."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
from pathlib import Path

# Must be set before anything imports jax: 8 CPU devices for the sharding tests, and no LLVM
# optimisation of the compiled code (tests are compile-bound on tiny models: ~3× faster).
# JAX_PLATFORMS=cpu: libtpu is installed for `qwenjax plan`, and must not try to open a TPU.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)

import numpy as np
import pytest


def rel_err(actual, expected) -> float:
    """max |a − e| / max |e|: the relative error every parity test states its tolerance in."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """`hf_checkpoint(layout)` → (transformers model, directory with config + shards + mtp.*)."""
    from tests.hf_models import make_hf_model, save_hf_checkpoint

    cache = {}

    def get(layout: str = "text", seed: int = 0):
        if (layout, seed) not in cache:
            model = make_hf_model(layout, seed)
            path = tmp_path_factory.mktemp(f"hf_{layout}_{seed}")
            save_hf_checkpoint(model, path, seed=seed)
            cache[layout, seed] = (model, path)
        return cache[layout, seed]

    return get


def _plan_place(config) -> tuple[Path, bool]:
    """Where the background plan run lives, and whether this process starts it. Under xdist
    every worker collects every test but only the first starts the run, in a directory named
    by the test run, so whichever worker gets the plan test waits for that one run."""
    worker = getattr(config, "workerinput", None)
    if worker is None:
        return Path(tempfile.mkdtemp(prefix="qwenjax-plan-")), True
    directory = Path(tempfile.gettempdir()) / f"qwenjax-plan-{worker['testrunuid']}"
    return directory, worker["workerid"] == "gw0"


def pytest_collection_modifyitems(session, config, items):
    """Start the slow 27B `qwenjax plan` compile at once when its test is selected, so it runs
    beside the other tests, and run that test last."""
    plan = [item for item in items if "plan_27b" in getattr(item, "fixturenames", ())]
    if not plan or config.getoption("collectonly"):
        return
    items[:] = [item for item in items if item not in plan] + plan
    if sys.platform == "linux" and platform.machine() == "x86_64":
        from tests.test_plan import PlanRun

        _PLAN["run"] = PlanRun(*_plan_place(config))


def pytest_sessionfinish(session, exitstatus):
    run = _PLAN.get("run")
    if run is None or not run.running():
        return
    # An xdist worker may finish its share before another worker's plan test has read the run.
    if hasattr(session.config, "workerinput") and exitstatus != pytest.ExitCode.INTERRUPTED:
        with contextlib.suppress(TimeoutError):
            run.wait()
    run.kill()


@pytest.fixture(scope="session")
def plan_27b(tmp_path_factory):
    if "run" not in _PLAN:
        from tests.test_plan import PlanRun

        _PLAN["run"] = PlanRun(tmp_path_factory.mktemp("plan"))
    return _PLAN["run"]


_PLAN: dict = {}  # the background `qwenjax plan` run, started at collection


@pytest.fixture(scope="module", autouse=True)
def _compiled_programs_freed_after_each_module():
    """XLA:CPU maps two or three memory regions for each compiled program and unmaps them only
    with the program, which jax's caches keep: a test worker reached Linux's limit of 65530
    mappings a process (vm.max_map_count) late in the suite (the core dump of that crash holds
    65529). The next compile then failed, and the C++ exception carrying its error crashed in
    the unwinder (SIGSEGV in `_Unwind_Find_FDE`): the one "XLA CPU crash" of earlier runs. An
    eager forward of the tiny model maps ~300 regions for each new input length. Cleared after
    each module, a worker peaked at 19001 mappings (in tests/kernels/test_gdn_decode.py), and
    the suite took as long as before."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="module", autouse=True)
def _no_engine_thread_outlives_its_module():
    """A serving scheduler's device loop still running after its test module would compile and
    run beside the next modules' tests (or in a dying interpreter): each module stops what it
    starts."""
    yield
    import threading
    import time

    deadline = time.monotonic() + 60
    while (left := [t for t in threading.enumerate() if t.name == "qwenjax-scheduler"]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not left, f"engine threads still running after the module: {left}"
