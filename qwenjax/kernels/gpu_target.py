"""Compile for an NVIDIA H100 on a host without a GPU (XLA deviceless ahead-of-time compilation).

    device = h100_compile_only()          # the CUDA plugin importable, no GPU
    spec = jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(device))
    jax.jit(fn).lower(spec).compile()     # Triton kernels to sm_90a code, XLA's launches

Triton compiles every Pallas GPU kernel here, so a kernel that does not compile for sm_90, or
asks for more shared memory than a block may have, fails on this CPU rather than on a lent GPU
(`benchmarks/gpu_compile.py` adds ptxas's register and spill counts). Call it with
`JAX_PLATFORMS=cpu`: the plugin then registers without probing for a device. The plugin is
`jax[cuda12-local]` (no CUDA libraries); keep it out of an everyday environment, e.g.
`pip install --no-deps --target DIR jax-cuda12-plugin==V jax-cuda12-pjrt==V` (V: this jax) and
DIR on PYTHONPATH for the compile (tests/tpu_aot.py's `cuda_plugin_path` does so).
"""

from __future__ import annotations

import jax
from jax.experimental import topologies

# XLA's GpuTargetConfig for an H100 SXM 80 GB: sm_90, 132 SMs, 227 KB opt-in shared memory a
# block, 50 MB L2; the cuDNN and CUDA versions only gate library features.
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def h100_compile_only() -> jax.Device:
    """A compile-only H100; RuntimeError naming the install when the CUDA plugin is missing."""
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=H100_SXM, topology="1x1x1"
        )
    except (NotImplementedError, RuntimeError) as e:
        raise RuntimeError(
            f"cannot compile for CUDA on this host ({e}); install this jaxlib's CUDA plugin: "
            f'pip install "jax[cuda12-local]=={jax.__version__}" (or --target DIR, on PYTHONPATH)'
        ) from None
    return topology.devices[0]
