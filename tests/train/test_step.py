"""The train step: accumulation over micro-batches equals one big batch; the loss trajectory is
the same on 1 device and on 8 (several mesh shapes); remat policies change memory, not results.

8 devices come from `--xla_force_host_platform_device_count=8` (tests/conftest.py). The model is
the small hybrid of `packing.SMALL`, or attention-only where the mixer does not matter (it
compiles twice as fast).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qwenjax import sharding as ax
from qwenjax.config import FULL_ATTENTION
from qwenjax.kernels.attention import auto_backend as attention_backend
from qwenjax.model.transformer import REMAT_POLICIES
from qwenjax.train.loss import target_counts
from qwenjax.train.optim import OptimConfig
from qwenjax.train.step import (
    init_train_state,
    jit_train_step,
    make_grad_fn,
    make_train_step,
    microbatches,
    split_model,
)
from tests.conftest import rel_err
from tests.train.packing import SMALL, packed_batch, random_model

T, CHUNK = 40, 16
OPTIM = OptimConfig(lr=3e-3, warmup_steps=1, total_steps=10, weight_decay=0.1)
ATTENTION_ONLY = SMALL.replace(num_hidden_layers=2, layer_types=(FULL_ATTENTION,) * 2)
needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS in tests/conftest.py)"
)


def batch(seed: int, rows: int) -> dict[str, np.ndarray]:
    return packed_batch(seed=seed, rows=rows, seq_len=T, vocab=SMALL.vocab_size)


def test_grad_accumulation_equals_one_big_batch():
    model = random_model(ATTENTION_ONLY, seed=3)
    big = batch(seed=3, rows=12)
    split = microbatches(big, 3)
    counts = [int(target_counts({k: x[j] for k, x in split.items()})[0]) for j in range(3)]
    assert len(set(counts)) > 1  # unequal micro-batches: a mean of means would differ
    _, params, frozen = split_model(model)
    grad_fn = jax.jit(make_grad_fn(model, mtp_weight=0.1, ce_chunk=CHUNK))
    g1, m1 = grad_fn(params, frozen, microbatches(big, 1))
    g3, m3 = grad_fn(params, frozen, split)
    pairs = zip(jax.tree.leaves(g3), jax.tree.leaves(g1), strict=True)
    assert max(rel_err(a, b) for a, b in pairs) <= 1e-5
    for name in ("loss", "ce_loss", "mtp_loss"):
        assert abs(float(m3[name]) - float(m1[name])) <= 1e-6 * float(m1[name])
    assert int(m3["tokens"]) == int(m1["tokens"]) == sum(counts)


MESHES = {
    "data=8": (ax.MeshConfig(data=8, fsdp=1), ax.FSDP_RULES),
    "fsdp=8": (ax.MeshConfig(fsdp=8), ax.FSDP_RULES),
    "fsdp=4,tensor=2": (ax.MeshConfig(fsdp=4, tensor=2), ax.FSDP_TP_RULES),
}


@pytest.fixture(scope="module")
def hybrid():
    return random_model(SMALL, seed=2)


def trajectory(model, mesh, rules, steps: int = 3) -> tuple[list[dict], object]:
    state, shardings = init_train_state(model, OPTIM, mesh, rules)
    step = jit_train_step(make_train_step(model, OPTIM, ce_chunk=CHUNK), mesh, rules, shardings)
    history = []
    for i in range(steps):  # 2 micro-batches of 8 rows per step
        state, metrics = step(state, microbatches(batch(seed=10 + i, rows=16), 2))
        history.append({k: float(v) for k, v in metrics.items()})
    return history, state


@pytest.fixture(scope="module")
def single_device(hybrid):
    mesh = ax.make_mesh(ax.MeshConfig(fsdp=1), devices=jax.devices()[:1])
    return trajectory(hybrid, mesh, ax.FSDP_RULES)[0]


@needs_8_devices
@pytest.mark.parametrize("name", MESHES)
def test_same_loss_trajectory_on_8_devices(hybrid, single_device, name):
    mesh_config, rules = MESHES[name]
    mesh = ax.make_mesh(mesh_config)
    history, state = trajectory(hybrid, mesh, rules)
    for want, got in zip(single_device, history, strict=True):
        for key in ("loss", "ce_loss", "mtp_loss"):
            assert abs(got[key] - want[key]) <= 1e-5 * abs(want[key]), (key, got, want)
        # The norm sums 10⁴ squares in a mesh-dependent order, after two Adam updates.
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        assert got["tokens"] == want["tokens"] and got["lr"] == want["lr"]
    assert single_device[-1]["loss"] < single_device[0]["loss"]  # it trains
    # Parameters and Adam moments stay sharded by the rules.
    q = state.params["blocks"]["layers"][1]["mixer"]["q_proj"]
    want_sharding = jax.NamedSharding(mesh, ax.spec(q.get_metadata()["out_sharding"], rules))
    assert q.get_value().sharding.is_equivalent_to(want_sharding, q.ndim)
    mu = state.opt_state[1][0].mu["blocks"]["layers"][1]["mixer"]["q_proj"].get_value()
    assert mu.sharding.is_equivalent_to(want_sharding, q.ndim)


@needs_8_devices
def test_context_parallel_gives_the_same_loss_and_gradients():
    """Tokens split 4 ways (`sequence`=4): every GDN and attention layer runs its
    context-parallel kernel, and loss and gradients are those of one device. As at 262K tokens:
    remat'd blocks, attention on the blockwise backend (FlashAttention backward), parameters
    split over fsdp x sequence."""
    model = random_model(SMALL, seed=5, remat="full")
    _, params, frozen = split_model(model)
    grad_fn = make_grad_fn(model, mtp_weight=0.1, ce_chunk=CHUNK)
    # Seed 11: row 1 has a document starting at token 20, exactly on a shard boundary.
    data = microbatches(batch(seed=11, rows=4), 1)
    want_grads, want_metrics = jax.jit(grad_fn)(params, frozen, data)

    mesh = ax.make_mesh(ax.MeshConfig(fsdp=2, sequence=4))
    batch_sharding = ax.batch_sharding(mesh, ax.FSDP_RULES, microbatched=True)
    placed = jax.device_put(
        (params, frozen, data),
        (
            ax.tree_shardings(params, mesh, ax.FSDP_RULES),
            ax.tree_shardings(frozen, mesh, ax.FSDP_RULES),
            {name: batch_sharding for name in data},
        ),
    )

    def sharded(params, frozen, data):
        with ax.use_rules(mesh, ax.FSDP_RULES), attention_backend("chunked"):
            return grad_fn(params, frozen, data)

    grads, metrics = jax.jit(sharded)(*placed)
    embed = placed[0]["embed_tokens"].get_value()
    assert embed.sharding.spec == P(None, ("fsdp", "sequence"))
    assert float(metrics["loss"]) == pytest.approx(float(want_metrics["loss"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert rel_err(a, b) <= 1e-4


def test_remat_policies_give_the_same_loss_and_gradients():
    config = ATTENTION_ONLY.replace(mtp_num_hidden_layers=0)
    rows = batch(seed=7, rows=4)
    data = microbatches(rows, 1)
    results = {}
    for policy in REMAT_POLICIES:
        model = random_model(config, seed=4, remat=policy)
        _, params, frozen = split_model(model)
        grad_fn = make_grad_fn(model, ce_chunk=CHUNK)
        results[policy] = jax.jit(grad_fn)(params, frozen, data)
        hidden = lambda m, b: m.hidden(b["input_ids"], b["positions"], b["segment_ids"])
        jaxpr = jax.make_jaxpr(hidden)(model, rows)
        # The scanned block only; for "layers", also each of its layers inside it.
        inner = len(config.block_pattern) if policy == "layers" else 0
        want_policies = [] if policy == "none" else [REMAT_POLICIES[policy]] * (1 + inner)
        assert _checkpoint_policies(jaxpr.jaxpr) == want_policies
    want_grads, want_metrics = results["none"]
    for policy, (grads, metrics) in results.items():
        assert float(metrics["loss"]) == pytest.approx(float(want_metrics["loss"]), rel=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
            assert rel_err(a, b) <= 1e-6, policy


def _checkpoint_policies(jaxpr) -> list:
    """Policies of the `jax.checkpoint`s in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if "prevent_cse" in eqn.params:  # a jax.checkpoint (primitive name varies by version)
            found.append(eqn.params["policy"])
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found += _checkpoint_policies(inner)
    return found
