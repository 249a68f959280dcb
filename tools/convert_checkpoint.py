"""HF safetensors ⇄ qwenjax checkpoint conversion; the same as `qwenjax convert`.

python tools/convert_checkpoint.py SRC DST [--dtype bfloat16|float32] [--max-shard-size 5GB]
                                           [--overwrite]
"""

import sys

from qwenjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
