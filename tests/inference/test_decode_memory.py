"""The compiled decode step updates the cache in place: the scan over super-blocks carries the
stacked cache instead of taking it as scanned inputs and stacking new outputs, which made XLA
hold a second copy of the whole cache and copy it out after the loop (v5p: 2904 MiB of
temporaries, H100: 2594 MiB, for a 1611 MiB cache).

With the decode kernels pinned (attention and Gated DeltaNet), the layers work inside the
carried stacks: the kernels take the stack and the block index, the attention layers scatter
only their new slots into it, and no KV cache or state is copied out of the stack or written
back (before: per attention layer and step a 256 MiB copy of K and of V and a 256 MiB write-back
of each; per Gated DeltaNet layer a 96 MiB copy and write-back of its state).

Compiled, not run: the 27B geometry with 2 of its 16 super-blocks, 32 rows x 4096 slots, for a
v5p and an H100 from this CPU (`benchmarks/decode_hlo.py` lists what remains).
"""

import pytest

from tests.tpu_aot import compile_report, cuda_plugin_path, needs_cuda_plugin, needs_libtpu

REPORT = r"""
import json, re, sys
from benchmarks.decode_hlo import compile_decode
target, tokens, kernels = sys.argv[1], int(sys.argv[2]), sys.argv[3]
min_mib = float(sys.argv[4]) if len(sys.argv) > 4 else 64
commit = len(sys.argv) > 5 and sys.argv[5] == "commit"
r = compile_decode(target, blocks=2, batch=32, max_length=4096, tokens=tokens, kernels=kernels,
                   min_mib=min_mib, commit=commit)
writes = [w for w in r["large_writes"] if not w["in_place"]]
# Whole KV caches (4096 slots) or fp32 states written, other than by in-place updates.
cache_writes = [w for w in writes if w["shape"].startswith("f32") or ",4096," in w["shape"]]
# Copies of a whole stack [2 blocks, 32 rows, ...] of caches or states.
stack_writes = [w for w in writes if re.match(r"\w+\[2,32,", w["shape"])]
print(json.dumps({"temp_mib": r["temp_mib"], "cache_mib": r["cache_mib"],
                  "cache_writes": cache_writes, "stack_writes": stack_writes, "writes": writes}))
"""


def _check(report: dict) -> None:
    # Measured: v5p 119 MiB, H100 596 MiB (one layer's K and V copied out of the stack).
    assert report["temp_mib"] < report["cache_mib"], report
    # On the H100, XLA had given the loop's carried KV stacks the layout attention's dots
    # prefer and transposed the whole cache into it and back (4 x 512 MiB here; at 16 blocks
    # 4692 MiB of temporaries, a second cache): `write_rows` now pins its result row-major.
    assert report["stack_writes"] == [], report


@needs_libtpu
@pytest.mark.parametrize(("tokens", "max_temp_mib"), [(1, 80), (3, 256)])
def test_v5p_decode_step_holds_no_second_cache(tokens, max_temp_mib):
    report = compile_report(REPORT, "v5p:2x2x1", tokens, "auto")
    _check(report)
    # The xla attention reads the layer's K and V `[B, K, S, H]` in place: from `[B, S, K, H]`
    # caches it copied both to that order, 2 x 256 MiB a layer and step (297 MiB temporaries).
    # The jnp GDN decode reads and updates the layer's state in the stack: its dot (and the
    # reshape of the slice into key-head groups) had XLA copy the slice out first, 96 MiB a
    # layer and step, and the token-serial scan of verification copied it twice more.
    assert report["cache_writes"] == [], report
    # Measured 42 MiB at T = 1 (before: 119), 156 at T = 3 (before: 711).
    assert report["temp_mib"] < max_temp_mib, report


@needs_libtpu
@needs_cuda_plugin
@pytest.mark.parametrize("target", ["v5p:2x2x1", "h100"])
def test_speculative_verification_and_commit_copy_no_state_stack(target):
    """MTP speculation's step: verify 2 drafts, then `commit` the kept tokens. The verification
    only reads the GDN states, and `commit` advances them, once, in closed form, block by block
    in place. The verification had advanced them in place, so XLA copied every old stack for
    `commit` to recompute from, by a token-serial scan over whole stacks (at all 16 blocks: v5p
    5841 MiB of temporaries, now 618; H100 7920, now 600)."""
    report = compile_report(REPORT, target, 3, "auto", 64, "commit", pythonpath=cuda_plugin_path())
    assert report["temp_mib"] < report["cache_mib"], report
    # No fp32 state written other than by in-place slice updates (the report's "writes" leave
    # those out): over all blocks at once, XLA:GPU's commit wrote each new stack apart and
    # copied it into the donated one.
    assert [w for w in report["writes"] if w["shape"].startswith("f32")] == [], report
    if target != "h100":  # (where the attention dots read copies of K and V slices)
        assert [w for w in report["cache_writes"] if ",4096," in w["shape"]] == [], report
    # Measured at these 2 blocks: v5p 190 MiB, H100 394 MiB (before: 1469, 1264).
    assert report["temp_mib"] < {"v5p:2x2x1": 256, "h100": 512}[target], report


@needs_cuda_plugin
def test_h100_decode_step_holds_no_second_cache():
    report = compile_report(REPORT, "h100", 1, "auto", pythonpath=cuda_plugin_path())
    _check(report)
    # No state transposed out of the stack for the GDN step's dot (3 x 96 MiB a block). Left:
    # the attention dots read copies of the layer's K and V (XLA:GPU of jax 0.10.2).
    assert [w for w in report["cache_writes"] if w["shape"].startswith("f32")] == [], report
    assert report["temp_mib"] < 400, report  # measured 308 MiB (before: 596)


@needs_libtpu
@needs_cuda_plugin
@pytest.mark.parametrize(
    ("target", "tokens", "kernels"),
    [
        ("v5p:2x2x1", 3, "attention=pallas_tpu,gdn=pallas_tpu"),
        ("h100", 1, "attention=pallas_gpu,gdn=pallas_gpu"),
    ],
)
def test_decode_kernels_work_inside_the_stacked_cache(target, tokens, kernels):
    report = compile_report(REPORT, target, tokens, kernels, pythonpath=cuda_plugin_path())
    assert report["cache_writes"] == [], report
    # Measured: v5p 34 MiB, H100 223 MiB (before: 1023 and 730, one layer's slices copied).
    assert report["temp_mib"] < 256, report


@needs_libtpu
def test_v5p_decode_step_reads_every_weight_in_place():
    """No weight is copied before its dot. A `[D, N, H]` projection weight was copied to the
    layout of a `[D, N·H]` one every step (TPU tiles the two minor dims), and XLA gave the
    projections the heads-major layout attention prefers, running them per head on a
    transposed copy of the weight: 120 MiB for q_proj, 60 MiB for each GDN z projection, per
    layer and step. Now the weights are 2-D and the projections' outputs pinned row-major."""
    report = compile_report(REPORT, "v5p:2x2x1", 1, "attention=pallas_tpu,gdn=pallas_tpu", 4)
    # Left: XLA's asynchronous prefetches of the k/v weights into on-chip memory (20 MiB).
    assert [w for w in report["writes"] if w["op"] not in ("copy-start", "copy-done")] == []
    assert report["temp_mib"] < 64, report  # measured 23 MiB (before: 141)


TENSOR_PARALLEL = r"""
import json
from benchmarks.decode_hlo import compile_decode
r = compile_decode("v5p:2x2x1", blocks=2, batch=32, max_length=4096, tokens=1, kernels="auto",
                   min_mib=8, tensor=4)
print(json.dumps({"temp_mib": r["temp_mib"],
                  "writes": [w for w in r["large_writes"] if not w["in_place"]]}))
"""


@needs_libtpu
def test_tensor_parallel_decode_step_gathers_no_cache_and_copies_no_weight():
    """On a 4-chip tensor-parallel v5p mesh, no chip gathers the KV stacks or copies a weight.
    A layout pin on the carried stacks (the fix for the H100's whole-cache transposes) made the
    partitioner gather both whole stacks onto every chip every step (1806 MiB of temporaries),
    so the stacks are not pinned under a mesh. Unpinned, the projections' results went
    heads-major, and each chip copied its shard of the q/z/v weights (150 MiB a block) before
    the dots every step; those pins now sit inside `shard_map`, per shard."""
    report = compile_report(TENSOR_PARALLEL, "v5p:2x2x1 tensor=4")  # argv: a label
    writes = report["writes"]
    # Left: XLA's prefetches of whole 2-block weight stacks into on-chip memory (only at 2
    # blocks). Gone: each chip's copy of each layer's fp32 GDN state (24 MiB) for the jnp step.
    assert [w for w in writes if w["shape"].startswith("bf16") and "copy-" not in w["op"]] == []
    assert [w for w in writes if w["shape"].startswith("f32")] == [], report
    assert [w for w in writes if w["mib"] > 32] == [], report
    assert report["temp_mib"] < 24, report  # measured 17 MiB (40 with the weight copies)
