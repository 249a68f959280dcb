"""Mesh construction, logical → mesh rules, golden partition specs of the 27B model under each
rules table (abstract model and mesh: no memory, no devices), and divisibility errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import qwenjax
from qwenjax import sharding as ax
from qwenjax.api import build_sharded
from qwenjax.config import FULL_ATTENTION
from tests.tpu_aot import compile_report, needs_libtpu


def abstract_mesh(data=1, fsdp=1, sequence=1, tensor=1) -> AbstractMesh:
    return AbstractMesh((data, fsdp, sequence, tensor), ax.MESH_AXES)


@pytest.fixture(scope="module")
def model_27b():
    config = qwenjax.ModelConfig.from_preset("qwen3.6-27b")
    return qwenjax.build(config, abstract=True, dtype=jnp.bfloat16, lora_rank=16)


def specs(model, mesh, rules) -> dict[str, P]:
    shardings = ax.param_shardings(model, mesh, rules)
    block = shardings["blocks"]["layers"]
    gdn, attn = block[0]["mixer"], block[3]["mixer"]
    return {
        "embed_tokens": shardings["embed_tokens"],
        "lm_head": shardings["lm_head"],
        "norm": shardings["norm"]["weight"],
        "in_proj_qkv": gdn["in_proj_qkv"],
        "conv1d": gdn["conv1d"],
        "A_log": gdn["A_log"],
        "out_proj": gdn["out_proj"],
        "q_proj": attn["q_proj"],
        "k_proj": attn["k_proj"],
        "o_proj": attn["o_proj"],
        "down_proj": block[0]["mlp"]["down_proj"],
        "q_proj_lora.a": attn["q_proj_lora"]["a"],
        "q_proj_lora.b": attn["q_proj_lora"]["b"],
        "mtp.fc": shardings["mtp"]["fc"],
    }


ZERO = ("fsdp", "sequence")  # parameters are split over both data-splitting axes
GOLDEN = {
    # ZeRO-3 over 64 devices: D is split, everything else whole; layers never split.
    "fsdp": (
        dict(fsdp=64),
        {
            "embed_tokens": P(None, ZERO),
            "lm_head": P(ZERO, None),
            "norm": P(ZERO),
            "in_proj_qkv": P(None, ZERO, None),
            "conv1d": P(None, None, None),
            "A_log": P(None, None),
            "out_proj": P(None, None, None, ZERO),
            "q_proj": P(None, ZERO, None),
            "k_proj": P(None, ZERO, None),
            "o_proj": P(None, None, None, ZERO),
            "down_proj": P(None, None, ZERO),
            "q_proj_lora.a": P(None, ZERO, None),
            "q_proj_lora.b": P(None, None, None),
            "mtp.fc": P(None, ZERO),
        },
    ),
    # FSDP 16 × tensor 4: heads, FFN width, GDN channels and vocab split over `tensor`.
    "fsdp_tp": (
        dict(fsdp=16, tensor=4),
        {
            "embed_tokens": P("tensor", ZERO),
            "lm_head": P(ZERO, "tensor"),
            "norm": P(ZERO),
            "in_proj_qkv": P(None, ZERO, "tensor"),
            "conv1d": P(None, None, "tensor"),
            "A_log": P(None, "tensor"),
            "out_proj": P(None, "tensor", None, ZERO),
            "q_proj": P(None, ZERO, "tensor"),
            "k_proj": P(None, ZERO, "tensor"),
            "o_proj": P(None, "tensor", None, ZERO),
            "down_proj": P(None, "tensor", ZERO),
            "q_proj_lora.a": P(None, ZERO, None),
            "q_proj_lora.b": P(None, None, "tensor"),
            "mtp.fc": P(None, ZERO),
        },
    ),
}


@pytest.mark.parametrize("rules_name", sorted(GOLDEN))
def test_27b_golden_partition_specs(model_27b, rules_name):
    mesh_sizes, golden = GOLDEN[rules_name]
    got = specs(model_27b, abstract_mesh(**mesh_sizes), ax.RULES[rules_name])
    assert {k: v.get_value().spec for k, v in got.items()} == golden


def test_sequence_axis_shards_parameters_too(model_27b):
    """Context parallelism splits tokens, not weights: on fsdp 2 x sequence 16 every parameter
    split over D is in 32 parts, so a 262K-token run keeps 1/32 of the state per chip."""
    mesh = abstract_mesh(fsdp=2, sequence=16)
    got = specs(model_27b, mesh, ax.FSDP_RULES)
    assert got["down_proj"].get_value().spec == P(None, None, ZERO)
    assert got["down_proj"].get_value().shard_shape((16, 17408, 5120)) == (16, 17408, 160)


def test_27b_divisibility_is_checked_for_every_parameter(model_27b):
    # 24 q heads, 4 kv heads, 48 GDN value heads, 10240 channels: tensor=5 divides none of them.
    with pytest.raises(ValueError, match="not divisible") as error:
        ax.param_shardings(model_27b, abstract_mesh(fsdp=2, tensor=5), ax.FSDP_TP_RULES)
    message = str(error.value)
    for problem in ("gdn_v_heads=48 not divisible by tensor=5", "q_heads=24", "kv_heads=4"):
        assert problem in message
    assert "['blocks']['layers'][0]['mixer']['A_log']" in message
    # k_proj [D, K·H] = [5120, 1024] splits 8 ways, but not into whole heads: 4 kv heads.
    with pytest.raises(ValueError, match="not divisible") as error:
        ax.param_shardings(model_27b, abstract_mesh(fsdp=1, tensor=8), ax.FSDP_TP_RULES)
    for name in ("k_proj", "v_proj", "k_proj_lora']['b"):
        assert f"[3]['mixer']['{name}']: kv_heads=4 not divisible by tensor=8" in str(error.value)
    assert "q_heads" not in str(error.value)  # 24 heads, 8 ways
    with pytest.raises(ValueError, match="embed=5120 not divisible by fsdp=3"):
        ax.param_shardings(model_27b, abstract_mesh(fsdp=3), ax.FSDP_RULES)


def test_mesh_config_fills_the_free_axis():
    assert ax.MeshConfig(data=2, tensor=2).shape(8) == dict(data=2, fsdp=2, sequence=1, tensor=2)
    assert ax.MeshConfig(data=-1, fsdp=1).shape(8)["data"] == 8
    with pytest.raises(ValueError, match="at most one -1"):
        ax.MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        ax.MeshConfig(data=3).shape(8)
    with pytest.raises(ValueError, match="needs 4 devices, have 8"):
        ax.MeshConfig(data=2, fsdp=2).shape(8)


def test_make_mesh_uses_all_devices_by_default():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
    mesh = ax.make_mesh(ax.MeshConfig(fsdp=-1, tensor=2))
    assert dict(mesh.shape) == dict(data=1, fsdp=4, sequence=1, tensor=2)
    assert mesh.axis_names == ax.MESH_AXES


def test_spec_rejects_unknown_names_and_reused_mesh_axes():
    want = P(("data", "fsdp"), "sequence", None)
    assert ax.spec((ax.BATCH, ax.LENGTH, None), ax.FSDP_RULES) == want
    with pytest.raises(ValueError, match="'heads' has no rule"):
        ax.spec(("heads",), ax.FSDP_RULES)
    with pytest.raises(ValueError, match=r"mesh axes \['fsdp', 'sequence'\] used twice"):
        ax.spec((ax.EMBED, ax.EMBED), ax.FSDP_RULES)


def test_constrain_is_a_no_op_without_rules_and_places_activations_with_them():
    x = jnp.ones((8, 4, 6))
    assert ax.constrain(x, ax.HIDDEN) is x
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = ax.make_mesh(ax.MeshConfig(data=2, fsdp=2, tensor=2))

    def f(x):
        with ax.use_rules(mesh, ax.FSDP_TP_RULES):
            return ax.constrain(x * 2, ax.HIDDEN)

    out = jax.jit(f)(x)
    want = NamedSharding(mesh, P(("data", "fsdp"), "sequence", None))
    assert out.sharding.is_equivalent_to(want, x.ndim)


def test_rows_of_a_batch_split_over_two_mesh_axes_move_alone():
    """`take_row` / `put_row` on `[L, B, N, H]` split over data x fsdp (batch) and tensor
    (heads), every row: equal to a plain dynamic slice and update, in place, with no gather."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = ax.make_mesh(ax.MeshConfig(data=2, fsdp=2, tensor=2))
    names = (None, ax.BATCH, ax.KV_HEADS, None)
    x = jax.random.normal(jax.random.key(0), (3, 8, 4, 5))
    new = jax.random.normal(jax.random.key(1), (3, 1, 4, 5))

    def f(x, new, i):
        with ax.use_rules(mesh, ax.FSDP_TP_RULES):
            x = ax.constrain(x, names)
            return ax.take_row(x, i, names, 1), ax.put_row(x, new, i, names, 1)

    f = jax.jit(f)
    for i in range(8):
        row, put = f(x, new, jnp.int32(i))
        assert (row == x[:, i : i + 1]).all() and (put == x.at[:, i : i + 1].set(new)).all()
    assert "all-gather" not in f.lower(x, new, jnp.int32(0)).compile().as_text()
    outside = jnp.int32(5)  # without rules: the plain slice
    assert (ax.take_row(x, outside, names, 1) == x[:, 5:6]).all()


def test_batch_the_mesh_cannot_split_is_rejected_clearly():
    mesh = abstract_mesh(data=2, fsdp=4)
    batch_sharding = ax.batch_sharding(mesh, ax.FSDP_RULES, microbatched=True)
    ax.check_batch((3, 8, 40), batch_sharding)
    with pytest.raises(ValueError, match="batch=6 not divisible by data=2×fsdp=4"):
        ax.check_batch((1, 6, 40), batch_sharding)


def test_build_sharded_creates_each_parameter_in_place():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    # Attention-only and no MTP: the init of GDN parameters would triple the compile time.
    config = qwenjax.ModelConfig.from_preset("tiny").replace(
        num_hidden_layers=2, layer_types=(FULL_ATTENTION,) * 2, mtp_num_hidden_layers=0
    )
    mesh = ax.make_mesh(ax.MeshConfig(fsdp=4, tensor=2))
    model = build_sharded(config, mesh, ax.FSDP_TP_RULES, lora_rank=2)
    unsharded = jax.jit(lambda: nnx.state(qwenjax.build(config, lora_rank=2)))()
    for (path, got), (_, want) in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(unsharded), strict=True
    ):
        spec = ax.spec(got.get_metadata()["out_sharding"], ax.FSDP_TP_RULES)
        assert got.get_value().sharding.is_equivalent_to(NamedSharding(mesh, spec), got.ndim), path
        assert (got.get_value() == want.get_value()).all(), path


# In a fresh process (tests/tpu_aot.py): TPU topology devices know their host, as on a pod.
_DATA_SHARDS_SCRIPT = """
import json, sys
import numpy as np
import jax
from jax.experimental import topologies
from qwenjax import sharding as ax

devices = topologies.get_topology_desc(sys.argv[1], platform="tpu").devices
hosts = sorted({d.process_index for d in devices})
fsdp = ax.RULES["fsdp"]

def shards(mesh, rules=fsdp):
    return [list(ax.data_shards(mesh, rules, process_index=p)) for p in hosts]

def error(mesh):
    try:
        ax.data_shards(mesh, fsdp, process_index=hosts[0])
    except ValueError as e:
        return str(e)

# fsdp 4 x tensor 2 with hosts h0 h0 / h0 h1 / h0 h1 / h1 h1: rows 1 and 2 on both, 0 and 3 not
by_host = sorted(devices, key=lambda d: (d.process_index, d.id))
overlapping = [by_host[i] for i in (0, 1, 2, 4, 3, 5, 6, 7)]
print(json.dumps({
    "fsdp": shards(ax.make_mesh(ax.MeshConfig(fsdp=-1), devices)),
    "sequence": shards(ax.make_mesh(ax.MeshConfig(fsdp=1, sequence=-1), devices)),
    "tensor": shards(ax.make_mesh(ax.MeshConfig(fsdp=1, tensor=-1), devices), ax.RULES["fsdp_tp"]),
    "overlap": error(jax.sharding.Mesh(np.array(overlapping).reshape(1, 4, 1, 2), ax.MESH_AXES)),
}))
"""


@needs_libtpu
def test_hosts_that_split_the_same_rows_read_the_same_data():
    """Data shards follow the batch layout: a host per shard when the batch axis spans hosts;
    one shard when every host holds all rows (tokens or heads split over the hosts)."""
    report = compile_report(_DATA_SHARDS_SCRIPT, "v5p:2x2x2")  # 8 chips on 2 hosts
    assert report["fsdp"] == [[0, 2], [1, 2]]  # make_mesh interleaves the hosts' chips here
    assert report["sequence"] == [[0, 1], [0, 1]]
    assert report["tensor"] == [[0, 1], [0, 1]]
    assert "partly shared batch shards" in report["overlap"]
    assert "{0: [0, 1, 2], 1: [1, 2, 3]}" in report["overlap"]
