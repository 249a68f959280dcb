"""The scheduler's row functions on a v5p whose 4 chips split the slots (`--mesh fsdp=4`),
compiled from this CPU: no chip gathers a whole cache or snapshot leaf. XLA partitions a
dynamic slice of the split slot axis by gathering the whole operand; before the rows moved
inside `shard_map`, admitting a request with a copy between slots gathered every slot's K/V and
GDN states onto each chip (129 MiB of temporaries for a 101 MiB cache shard, 2 of the 27B's 16
super-blocks, 8 slots x 4096), and so did every prefill chunk (363 MiB, against 255 now:
`python -m benchmarks.serve_hlo`, whose prefill compile takes minutes, so it is left out here).
"""

from tests.tpu_aot import compile_report, needs_libtpu

REPORT = r"""
import json
from benchmarks.serve_hlo import compile_serving
r = compile_serving("v5p:2x2x1", blocks=2, slots=8, max_length=4096, chunk=256, fsdp=4,
                    functions=("admit_copy", "snapshot"))
print(json.dumps(r))
"""


@needs_libtpu
def test_admission_and_snapshots_gather_no_cache_on_a_slot_split_v5p():
    report = compile_report(REPORT, "v5p:2x2x1 fsdp=4")  # argv: a label
    for name in ("admit_copy", "snapshot"):
        assert report[name]["cache_gathers"] == [], report
        # Measured: 43 MiB for the copy (before: 129), 18 for a snapshot (before: 48).
        assert report[name]["temp_mib"] < report["cache_mib_per_chip"] / 2, report
    # Beside XLA's moves of a chip's small K/V stacks into on-chip memory and back (copy-start
    # and -done, S(1), only at 2 blocks), one row is written outside the cache: the source's
    # K and V rows, selected on the chip that holds them and summed over the chips.
    row_mib = 16.1  # [2 blocks, 1 slot, 4 KV heads, 4112 slots, 256] bf16
    writes = [c for c in report["admit_copy"]["copies"] if not c["op"].startswith("copy-")]
    assert writes and all(c["mib"] < row_mib + 0.1 for c in writes), report
