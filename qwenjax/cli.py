"""`qwenjax <verb>`: one library call per verb; argument parsing lives here once."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _convert(args: argparse.Namespace) -> None:
    from qwenjax.checkpoint.convert import convert

    out = convert(
        args.src,
        args.dst,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")


def _demo(args: argparse.Namespace) -> None:
    from qwenjax.demo import run_demo

    run_demo(args.run_dir, seed=args.seed)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwenjax", description=__doc__)
    verbs = p.add_subparsers(dest="verb", required=True)

    demo = verbs.add_parser("demo", help="run the whole pipeline on the embedded tiny model")
    demo.add_argument("--run-dir", default="runs/demo", help="where checkpoints are written")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    conv = verbs.add_parser(
        "convert", help="HF safetensors ⇄ qwenjax checkpoint (direction from SRC)"
    )
    conv.add_argument("src", help="HF checkpoint directory or qwenjax checkpoint directory")
    conv.add_argument("dst", help="directory to create")
    conv.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                      help="cast every tensor (default: keep each tensor's dtype)")  # fmt: skip
    conv.add_argument("--max-shard-size", default="5GB", help="HF export shard size limit")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    conv.set_defaults(func=_convert)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"qwenjax {args.verb}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
