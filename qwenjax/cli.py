"""`qwenjax <verb>`: one library call per verb; argument parsing lives here once.

`generate` / `chat` run `qwenjax.inference.jobs`, `serve` runs `qwenjax.serve.app`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


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
    print(f"compiling the train step for {args.topology} (the 27B takes minutes) ...", flush=True)
    report = plan(cfg, args.topology, model_config=model)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not report["fits"]:
        raise SystemExit(1)


def _generate(args: argparse.Namespace) -> None:
    from qwenjax.inference.jobs import run_generate

    run_generate(args)


def _chat(args: argparse.Namespace) -> None:
    from qwenjax.inference.jobs import run_chat

    run_chat(args)


def _serve(args: argparse.Namespace) -> None:
    from qwenjax.inference.jobs import mesh_from_args
    from qwenjax.serve.app import serve

    mesh, rules = mesh_from_args(args)
    serve(args, mesh, rules)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="the key clients must send (default: $QWENJAX_API_KEY)")  # fmt: skip
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: qwen/qwen3.6-27b for that "
                        "checkpoint, else the directory name)")  # fmt: skip
    p.add_argument("--slots", type=int, default=8, help="concurrent decode slots (default 8)")
    p.add_argument("--max-length", type=int, default=4096,
                   help="tokens per request, prompt + reply (default 4096)")  # fmt: skip
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per engine step (default 256)")  # fmt: skip
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt whole; by default a prompt that starts with what "
                        "a slot's cache holds (the previous turn of a chat or tool loop, or a "
                        "system prompt another conversation sent) prefills only the rest, for two "
                        "GDN state copies per slot")  # fmt: skip
    p.add_argument("--max-waiting", type=int, default=256,
                   help="queued requests before 429 / 529 (default 256)")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get on SIGTERM (default 30)")  # fmt: skip
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="images: resize each to at most this many pixels (default: the "
                        "checkpoint's preprocessor_config.json)")  # fmt: skip
    p.add_argument("--max-images", type=int, default=None,
                   help="images per request at most, else a 400 (default: no limit but "
                        "--max-length)")  # fmt: skip
    # Lets a request script its output (`qwenjax_forced_tokens`): for the tests only.
    p.add_argument("--enable-test-hooks", action="store_true", help=argparse.SUPPRESS)


def _add_model_args(p: argparse.ArgumentParser, random_weights: bool = False) -> None:
    if random_weights:  # serve: a checkpoint, or a preset's shapes with random weights
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--checkpoint", help="HF or qwenjax checkpoint directory")
        src.add_argument("--random-weights", metavar="PRESET",
                         help="serve a preset (e.g. qwen3.6-27b) with random weights, for load "
                              "benchmarks; needs --tokenizer")  # fmt: skip
        p.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    else:
        p.add_argument("--checkpoint", required=True, help="HF or qwenjax checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: checkpoint)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="cast the parameters (default: the checkpoint's dtypes)")  # fmt: skip
    p.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=-1,tensor=1 (default: 1 device)")
    p.add_argument("--rules", choices=["fsdp", "fsdp_tp"], default="fsdp",
                   help="sharding rules on --mesh")  # fmt: skip
    p.add_argument("--speculative-tokens", type=int, default=0,
                   help="draft K tokens per step with the MTP head (0: off)")  # fmt: skip
    p.add_argument("--attention-kernel", default="auto",
                   choices=["auto", "xla", "chunked", "pallas_gpu", "pallas_tpu"],
                   help="attention over the KV cache while decoding: pallas_gpu / pallas_tpu "
                        "read only each request's own keys (not yet timed, so auto keeps "
                        "xla)")  # fmt: skip
    p.add_argument("--gdn-kernel", default="auto",
                   choices=["auto", "reference", "chunked", "pallas_gpu", "pallas_tpu"],
                   help="the Gated DeltaNet rule, prefill and decode: pallas_gpu / pallas_tpu "
                        "also decode and verify drafts in one kernel that reads and writes "
                        "the recurrent state once (untimed: auto keeps the jnp step)")  # fmt: skip


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"tokens per reply at most (default {max_new_tokens})")  # fmt: skip
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: generation_config.json, else 1)")  # fmt: skip
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None,
                   help="request i (turn i in chat) without its own seed uses seed+i")  # fmt: skip


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
    pl.add_argument("--json", default=None, help="also write the report (bytes) to this file")
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

    gen = verbs.add_parser(
        "generate", help="complete prompts or JSONL requests in batches (text or chat)"
    )
    _add_model_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--input", help='JSONL: {"prompt": ...} or {"messages": [...]} + overrides')
    gen.add_argument("--output", help="JSONL results, in input order (default: stdout)")
    gen.add_argument("--chat", action="store_true", help="send prompts as user chat messages")
    gen.add_argument("--no-thinking", action="store_true", help="chat: enable_thinking=False")
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts per device batch (8)")
    gen.add_argument("--max-pixels", type=int, default=None,
                     help="chat images: at most this many pixels each "
                          "(default: the checkpoint's)")  # fmt: skip
    _add_sampling_args(gen, 256)
    gen.set_defaults(func=_generate)

    ch = verbs.add_parser("chat", help="an interactive conversation on stdin/stdout (streams)")
    _add_model_args(ch)
    ch.add_argument("--system", default=None, help="a system prompt")
    ch.add_argument("--no-thinking", action="store_true", help="enable_thinking=False")
    ch.add_argument("--preserve-thinking", action="store_true",
                    help="feed earlier turns' reasoning back to the model")  # fmt: skip
    ch.add_argument("--image", action="append",
                    help="an image file for the first turn (repeatable; a VLM "
                         "checkpoint)")  # fmt: skip
    ch.add_argument("--video", action="append",
                    help="a directory of video frames for the first turn (repeatable)")  # fmt: skip
    ch.add_argument("--video-fps", type=float, default=None,
                    help="frame rate of the --video frames (they are then sampled at the "
                         "processor's fps; default: all kept, taken as sampled at it)")  # fmt: skip
    ch.add_argument("--max-pixels", type=int, default=None,
                    help="resize images to at most this many pixels (default: the "
                         "checkpoint's)")  # fmt: skip
    _add_sampling_args(ch, 1024)
    ch.set_defaults(func=_chat)

    sv = verbs.add_parser(
        "serve", help="an OpenAI- and Anthropic-compatible HTTP server (continuous batching)"
    )
    _add_model_args(sv, random_weights=True)
    _add_serve_args(sv)
    sv.set_defaults(func=_serve)
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
