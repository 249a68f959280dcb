"""Checkpoints: the HF key table, streaming safetensors and orbax I/O, conversion and `load`.

`convert()` itself stays in `qwenjax.checkpoint.convert`: re-exporting it here would shadow
the submodule of the same name.
"""

from qwenjax.checkpoint.convert import hf_to_qwenjax, load, qwenjax_to_hf
from qwenjax.checkpoint.hf_io import CheckpointError

__all__ = ["CheckpointError", "hf_to_qwenjax", "load", "qwenjax_to_hf"]
