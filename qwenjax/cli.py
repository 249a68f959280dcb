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

    run_demo(args.run_dir, tuple(args.overrides))


def _train(args: argparse.Namespace) -> None:
    from qwenjax.runconfig import load_run_config
    from qwenjax.train.loop import train

    train(load_run_config(args.config, args.overrides))


def _plan(args: argparse.Namespace) -> None:
    from qwenjax.config import ModelConfig
    from qwenjax.plan import plan, print_report
    from qwenjax.runconfig import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    model = ModelConfig.from_preset(args.model) if args.model else None
    report = plan(cfg, args.topology, model_config=model)
    print_report(report)
    if not report["fits"]:
        raise SystemExit(1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwenjax", description=__doc__)
    verbs = p.add_subparsers(dest="verb", required=True)

    demo = verbs.add_parser("demo", help="train, evaluate and convert the embedded tiny model")
    demo.add_argument("--run-dir", default="runs/demo", help="where data and checkpoints go")
    demo.add_argument("overrides", nargs="*", help="key=value overrides of tiny-demo.yaml")
    demo.set_defaults(func=_demo)

    tr = verbs.add_parser("train", help="fine-tune from a run config (YAML)")
    tr.add_argument("--config", required=True, help="configs/<run>.yaml")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    tr.set_defaults(func=_train)

    pl = verbs.add_parser("plan", help="compile the train step for a TPU topology; does it fit?")
    pl.add_argument("--config", required=True, help="the run config to check")
    pl.add_argument("--topology", required=True, help="e.g. v5p-64, v6e-16, v5p:2x2x2")
    pl.add_argument("--model", default=None, help="a preset instead of the config's model")
    pl.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    pl.set_defaults(func=_plan)

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
