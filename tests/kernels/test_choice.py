"""The run config's `kernels:` section: what `backend="auto"` means while a run traces."""

from __future__ import annotations

import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.kernels.choice import KernelChoice, current
from qwenjax.kernels.gated_delta_rule import api as gdn_api
from qwenjax.runconfig import RunConfigError, load_run_config

TINY = Path(__file__).parents[2] / "configs" / "tiny-demo.yaml"


def _spy(monkeypatch, table: dict) -> list[str]:
    """Records the name of every backend of `table` that runs."""
    called = []
    for name, fn in list(table.items()):
        wrapped = lambda *a, _n=name, _f=fn, **kw: called.append(_n) or _f(*a, **kw)
        monkeypatch.setitem(table, name, wrapped)
    return called


def test_pinned_choice_is_what_auto_runs_inside_the_block(monkeypatch):
    called = _spy(monkeypatch, gdn_api._BACKENDS)
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 9, 1, 8)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(1, 9, 2, 8)), jnp.float32)
    g = -jnp.asarray(rng.uniform(size=(1, 9, 2)), jnp.float32)
    beta = jnp.asarray(rng.uniform(size=(1, 9, 2)), jnp.float32)
    run = lambda: jax.eval_shape(lambda *x: gdn_api.gated_delta_rule(*x), q, k, v, g, beta)
    run()
    with KernelChoice().pinned():
        run()
    with KernelChoice(gated_delta_rule="pallas_tpu", attention="splash").pinned():
        run()
        assert current() == KernelChoice(gated_delta_rule="pallas_tpu", attention="splash")
    run()
    assert called == ["chunked", "chunked", "pallas_tpu", "chunked"]  # auto is chunked on CPU
    assert current() == KernelChoice()


def test_pins_are_per_thread():
    """A pin set on one thread never reaches a trace on another (the serving scheduler traces on
    its own thread, under the pins its graph was built with)."""
    seen = []
    with KernelChoice(attention="xla").pinned():
        thread = threading.Thread(target=lambda: seen.append(current()))
        thread.start()
        thread.join()
        assert current() == KernelChoice(attention="xla")
    assert seen == [KernelChoice()] and current() == KernelChoice()


def test_unknown_backends_and_other_platforms_kernels_are_refused():
    with pytest.raises(RunConfigError, match=r"kernels\.attention 'flash': choose from auto, xla"):
        load_run_config(TINY, ["kernels.attention=flash"])
    with pytest.raises(RunConfigError, match=r"kernels: unknown key\(s\) \['gdn'\]"):
        load_run_config(TINY, ["kernels.gdn=chunked"])
    choice = KernelChoice(gated_delta_rule="pallas_tpu")
    choice.check_platform("tpu")
    with pytest.raises(ValueError, match=r"pallas_tpu is a TPU kernel.*compiles for GPU"):
        choice.check_platform("gpu")
    with pytest.raises(ValueError, match=r"kernels\.attention=cudnn is a GPU kernel"):
        KernelChoice(attention="cudnn").check_platform("cpu")
    KernelChoice(gated_delta_rule="chunked", attention="chunked").check_platform("cpu")
