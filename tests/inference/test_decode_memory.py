"""The compiled decode step updates the cache in place: the scan over super-blocks carries the
stacked cache (each block reads its slice and writes it back) instead of taking it as scanned
inputs and stacking new outputs, which made XLA hold a second copy of the whole cache and copy
it out after the loop (v5p: 2904 MiB of temporaries, H100: 2594 MiB, for a 1611 MiB cache).

Compiled, not run: the 27B geometry with 2 of its 16 super-blocks, 32 rows x 4096 slots, for a
v5p and an H100 from this CPU (`benchmarks/decode_hlo.py` lists what remains).
"""

from tests.tpu_aot import compile_report, cuda_plugin_path, needs_cuda_plugin, needs_libtpu

REPORT = r"""
import json, sys
from benchmarks.decode_hlo import compile_decode
r = compile_decode(sys.argv[1], blocks=2, batch=32, max_length=4096, tokens=1, kernels="auto")
print(json.dumps({k: r[k] for k in ("temp_mib", "cache_mib")}))
"""


def _check(report: dict) -> None:
    # Measured after the change: v5p 1026 MiB, H100 1277 MiB (one layer's slices in flight).
    assert report["temp_mib"] < report["cache_mib"], report


@needs_libtpu
def test_v5p_decode_step_holds_no_second_cache():
    _check(compile_report(REPORT, "v5p:2x2x1"))


@needs_cuda_plugin
def test_h100_decode_step_holds_no_second_cache():
    _check(compile_report(REPORT, "h100", pythonpath=cuda_plugin_path()))
