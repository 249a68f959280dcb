"""`qwenjax generate` and `qwenjax chat`: batch generation jobs over JSONL and the chat REPL.

The command line (`qwenjax/cli.py`) parses the flags; this module does the file and terminal
work around the engine (`Engine`) and the text layer (`qwenjax.inference.text`): reading
requests, batching, progress, writing results atomically, and the interactive loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------- generate / chat
# Per-request keys of a JSONL input line besides the sampling parameters (OpenAI names).
_RECORD_KEYS = ("id", "prompt", "messages", "tools", "enable_thinking")


@dataclasses.dataclass(frozen=True)
class _Request:
    """One prompt of `qwenjax generate`, ready for the engine."""

    index: int
    where: str  # "line 3" / "prompt 1", for error messages
    id: Any
    prompt_ids: list[int]
    params: Any  # SamplingParams
    chat: bool
    thinking_open: bool
    tools: Any
    vision: Any = None  # VisionInputs of the messages' images and videos


def _sampling_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint's generation_config.json sampling values, overridden by the flags."""
    from qwenjax.inference.sampling import checkpoint_defaults

    defaults = checkpoint_defaults(args.checkpoint)
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if getattr(args, name, None) is not None:
            defaults[name] = getattr(args, name)
    if getattr(args, "stop", None):
        defaults["stop"] = tuple(args.stop)
    return defaults


def mesh_from_args(args: argparse.Namespace):
    """(mesh, rules) from `--mesh data=..,fsdp=..,tensor=..` and `--rules`; (None, None) without."""
    if not args.mesh:
        return None, None
    from qwenjax.sharding import MESH_AXES, RULES, MeshConfig, make_mesh

    sizes = {}
    for part in args.mesh.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise ValueError(
                f"--mesh takes axis=size pairs over {', '.join(MESH_AXES)}, got {part!r}"
            )
        sizes[name] = int(value)
    return make_mesh(MeshConfig(**sizes)), RULES[args.rules]


def _check_checkpoint(args: argparse.Namespace) -> None:
    if not Path(args.checkpoint).is_dir():
        raise FileNotFoundError(f"checkpoint directory {args.checkpoint} does not exist")


def _batch_split(mesh) -> int:
    """How many ways a batch is split on `mesh` (its data × fsdp axes); 1 without a mesh."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def _load_engine(args: argparse.Namespace, mesh, rules, *, vision: bool = False):
    """Load the checkpoint (with its vision tower for `vision`) and wrap it in an `Engine`
    (which keeps the `--attention-kernel` / `--gdn-kernel` pins it is built under)."""
    import jax

    from qwenjax.checkpoint import load
    from qwenjax.inference.engine import Engine
    from qwenjax.kernels.choice import kernel_flags

    kernels = kernel_flags(args, jax.default_backend())
    print(f"loading {args.checkpoint} ...", file=sys.stderr, flush=True)
    model = load(args.checkpoint, dtype=args.dtype, mesh=mesh, rules=rules, vision=vision)
    with kernels.pinned():
        return Engine(model, mesh=mesh, rules=rules)


def _processor(args: argparse.Namespace):
    """The checkpoint's image/video preprocessing, with `--max-pixels` if given."""
    from qwenjax.vision.processor import Processor

    budget = {"max_pixels": args.max_pixels} if getattr(args, "max_pixels", None) else {}
    return Processor.from_dir(args.checkpoint, **budget)


def _read_records(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(where, record) for each `--prompt` or each non-blank line of `--input`."""
    if args.prompt:
        key = (lambda p: {"messages": [{"role": "user", "content": p}]}) if args.chat else None
        return [
            (f"prompt {i + 1}", key(p) if key else {"prompt": p}) for i, p in enumerate(args.prompt)
        ]
    path = Path(args.input)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {line.strip()!r}")
            records.append((f"{path}:{number}", record))
    if not records:
        raise ValueError(f"{path} has no requests")
    return records


def _request(
    index: int, where: str, record: dict, defaults: dict, args, tokenizer, processor
) -> _Request:
    from qwenjax.inference.sampling import SamplingParams
    from qwenjax.inference.text import chat_inputs, opens_thinking

    names = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = sorted(set(record) - names - set(_RECORD_KEYS) - {"max_completion_tokens"})
    if unknown:
        known = ", ".join(sorted({*_RECORD_KEYS, *names, "max_completion_tokens"}))
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {known}")
    if ("prompt" in record) == ("messages" in record):
        raise ValueError(f"{where}: give exactly one of 'prompt' (text) or 'messages' (chat)")
    overrides = {k: v for k, v in record.items() if k in names and v is not None}
    if record.get("max_completion_tokens") is not None:
        overrides["max_tokens"] = record["max_completion_tokens"]
    settings = {**defaults, **overrides}
    if settings.get("seed") is None and args.seed is not None:
        settings["seed"] = args.seed + index  # reproducible whatever the batching
    settings.setdefault("max_tokens", args.max_new_tokens)
    try:
        params = SamplingParams(**settings).validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    tools = record.get("tools")
    if "messages" in record:
        messages = record["messages"]
    elif args.chat:
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        messages = None
    chat = messages is not None
    if chat:
        thinking = record.get("enable_thinking", False if args.no_thinking else None)
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{where}: 'messages' must be a list of objects")
        if thinking not in (None, True, False):
            raise ValueError(f"{where}: 'enable_thinking' must be true or false")
        if tools is not None and not isinstance(tools, list):
            raise ValueError(f"{where}: 'tools' must be a list of tool schemas")
        try:
            ids, vision = chat_inputs(
                tokenizer, messages, tools, processor=processor, enable_thinking=thinking
            )
        except (TypeError, ValueError, FileNotFoundError) as e:
            raise ValueError(f"{where}: cannot render the messages: {e}") from None
    else:
        vision = None
        if not isinstance(record["prompt"], str):
            raise ValueError(f"{where}: 'prompt' must be a string, got {record['prompt']!r}")
        ids = tokenizer.encode(record["prompt"])
    if not ids:
        raise ValueError(f"{where}: the prompt is empty")
    return _Request(
        index=index,
        where=where,
        id=record.get("id"),
        prompt_ids=ids,
        params=params,
        chat=chat,
        thinking_open=chat and opens_thinking(tokenizer, ids),
        tools=tools,
        vision=vision,
    )


def _output_record(request: _Request, completion) -> dict:
    from qwenjax.chat import parse_reply

    out = {"index": request.index}
    if request.id is not None:
        out["id"] = request.id
    out |= {
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "stop_reason": completion.stop_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": len(completion.token_ids),
        "token_ids": completion.token_ids,
    }
    if request.chat:
        parsed = parse_reply(
            completion.text, tools=request.tools, thinking_open=request.thinking_open
        )
        out |= parsed
    if completion.logprobs is not None:
        out["logprobs"] = completion.logprobs
    return out


class _Progress:
    """`generate: 8/100 prompts, 1,024 tokens, 55.1 tok/s` on stderr (one updating line on a
    terminal, a line per batch otherwise)."""

    def __init__(self, total: int):
        self.total, self.done, self.tokens = total, 0, 0
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, prompts: int, tokens: int) -> None:
        self.done += prompts
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        line = (
            f"generate: {self.done}/{self.total} prompts, {self.tokens:,} tokens, {rate:.1f} tok/s"
        )
        sys.stderr.write("\r\033[K" + line if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def run_generate(args: argparse.Namespace) -> None:
    """Batches of `--batch-size` in input order. JSONL output goes line by line, in input order,
    to `OUTPUT.partial`, renamed to OUTPUT once every request is done (a failed run leaves the
    finished lines there); without --output it goes to stdout (text only for --prompt)."""
    from qwenjax.inference.sampling import SamplingParams
    from qwenjax.inference.text import complete
    from qwenjax.tokenizer import Tokenizer

    if args.batch_size < 1 or args.max_new_tokens < 1 or args.speculative_tokens < 0:
        raise ValueError(
            "--batch-size and --max-new-tokens must be >= 1, --speculative-tokens >= 0"
        )
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise FileNotFoundError(f"the directory of --output {args.output} does not exist")
    _check_checkpoint(args)
    defaults = _sampling_defaults(args)
    tokenizer = Tokenizer.from_dir(args.tokenizer or args.checkpoint)
    records = _read_records(args)
    processor = _processor(args)
    requests = [
        _request(i, where, record, defaults, args, tokenizer, processor)
        for i, (where, record) in enumerate(records)
    ]
    mesh, rules = mesh_from_args(args)
    split = _batch_split(mesh)
    if args.batch_size % split:
        raise ValueError(
            f"--batch-size {args.batch_size} must divide over the mesh's data × fsdp = {split} "
            "devices (or put the devices on tensor=N with --rules fsdp_tp)"
        )
    batch = -(-min(args.batch_size, len(requests)) // split) * split
    engine = _load_engine(args, mesh, rules, vision=any(r.vision is not None for r in requests))
    vocab = engine.config.vocab_size
    for r in requests:  # the engine would name a row of a batch; name the request instead
        if max(r.prompt_ids) >= vocab:
            raise ValueError(f"{r.where}: the tokenizer made ids >= the model's vocab ({vocab})")
        try:
            r.params.validate(vocab)
        except ValueError as e:
            raise ValueError(f"{r.where}: {e}") from None
    # One buffer size and top-logprobs width for every batch: one compiled program.
    max_new = max(r.params.max_tokens for r in requests)
    num_top = max((r.params.top_logprobs or 0) if r.params.logprobs else 0 for r in requests)
    # Keeps the last batch at full size (same program); these rows stop after one token.
    filler = SamplingParams(temperature=0.0, max_tokens=1)

    plain_text = bool(args.prompt) and not args.output
    partial = Path(args.output + ".partial") if args.output else None
    sink = partial.open("w", encoding="utf-8") if partial else sys.stdout
    progress = _Progress(len(requests))
    texts = []
    try:
        for start in range(0, len(requests), batch):
            chunk = requests[start : start + batch]
            pad = batch - len(chunk)
            shortest = min(chunk, key=lambda r: len(r.prompt_ids))
            completions = complete(
                engine,
                tokenizer,
                [r.prompt_ids for r in chunk] + [shortest.prompt_ids] * pad,
                [r.params for r in chunk] + [filler] * pad,
                max_new_tokens=max_new,
                num_speculative_tokens=args.speculative_tokens,
                num_top_logprobs=num_top,
                vision=[r.vision for r in chunk] + [shortest.vision] * pad,
            )[: len(chunk)]
            for r, c in zip(chunk, completions, strict=True):
                if plain_text:
                    texts.append(c.text)
                else:
                    sink.write(json.dumps(_output_record(r, c), ensure_ascii=False) + "\n")
            sink.flush()
            progress.update(len(chunk), sum(len(c.token_ids) for c in completions))
    finally:
        progress.close()
        if partial:
            sink.close()
    if partial:
        os.replace(partial, args.output)
        print(f"wrote {len(requests)} completions to {args.output}", file=sys.stderr)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- prompt {i + 1} ---")
        print(text)


def _read_turn(interactive: bool) -> str | None:
    """The next user line, or None at EOF / Ctrl-C / Ctrl-D."""
    if interactive:
        try:
            return input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


class _ReplyPrinter:
    """Writes a streamed reply to stdout. On a terminal the reasoning (up to `</think>`) is dimmed,
    its tags hidden, and the blank lines before the answer dropped; otherwise the reply is written
    as generated, after the `<think>` the prompt opened."""

    END = "</think>"

    def __init__(self, thinking_open: bool):
        self.color = sys.stdout.isatty()
        self.thinking = thinking_open
        self.answering = False  # the answer's first visible character was written
        self.buffer = ""
        if thinking_open:
            sys.stdout.write("\033[2m" if self.color else "<think>\n")

    def write(self, text: str) -> None:
        from qwenjax.inference.text import partial_stop_length

        if not self.color:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        self.buffer += text
        if self.thinking:
            end = self.buffer.find(self.END)
            if end < 0:  # hold back what could be the start of </think>, and blank lines
                keep = len(self.buffer) - partial_stop_length(self.buffer, (self.END,))
                keep = len(self.buffer[:keep].rstrip())
                sys.stdout.write(self.buffer[:keep])
                self.buffer = self.buffer[keep:]
            else:
                reasoning = self.buffer[:end].rstrip()
                sys.stdout.write(reasoning + "\033[0m\n")
                self.buffer, self.thinking = self.buffer[end + len(self.END) :], False
        if not self.thinking:
            if not self.answering:
                self.buffer = self.buffer.lstrip()
                self.answering = bool(self.buffer)
            sys.stdout.write(self.buffer)
            self.buffer = ""
        sys.stdout.flush()

    def close(self) -> None:
        sys.stdout.write(self.buffer + ("\033[0m" if self.color and self.thinking else "") + "\n")
        sys.stdout.flush()


def _media_parts(args: argparse.Namespace) -> list[dict]:
    """Content parts of `--image` / `--video` (checked now, loaded at every turn's render)."""
    parts = []
    for path in args.image or ():
        if not Path(path).is_file():
            raise FileNotFoundError(f"--image {path} does not exist")
        parts.append({"type": "image", "image": path})
    for path in args.video or ():
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--video {path} is not a directory of frame images")
        fps = {"fps": args.video_fps} if args.video_fps else {}
        parts.append({"type": "video", "video": path, **fps})
    return parts


def run_chat(args: argparse.Namespace) -> None:
    """A conversation on stdin/stdout; each turn renders the whole history with the template.
    `--image` / `--video` go into the first user turn (and so stay in the history)."""
    from qwenjax.chat import parse_reply
    from qwenjax.inference.sampling import SamplingParams
    from qwenjax.inference.text import chat_inputs, opens_thinking, stream
    from qwenjax.tokenizer import Tokenizer

    if args.max_new_tokens < 1 or args.speculative_tokens < 0:
        raise ValueError("--max-new-tokens must be >= 1 and --speculative-tokens >= 0")
    _check_checkpoint(args)
    defaults = _sampling_defaults(args)
    SamplingParams(**defaults).validate()
    tokenizer = Tokenizer.from_dir(args.tokenizer or args.checkpoint)
    mesh, rules = mesh_from_args(args)
    if _batch_split(mesh) != 1:
        raise ValueError(
            "chat decodes one conversation: give the mesh data=1,fsdp=1 and put the devices on "
            "tensor=N with --rules fsdp_tp"
        )
    media = _media_parts(args)
    processor = _processor(args)
    engine = _load_engine(args, mesh, rules, vision=bool(media))
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: /reset clears the conversation, /exit (or Ctrl-D) quits", file=sys.stderr)
    turn = 0
    while (line := _read_turn(interactive)) is not None:
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = list(system)
            print("[conversation reset]", flush=True)
            continue
        first = not any(m["role"] == "user" for m in history)
        content = [*media, {"type": "text", "text": line}] if media and first else line
        messages = [*history, {"role": "user", "content": content}]
        ids, vision = chat_inputs(
            tokenizer,
            messages,
            processor=processor,
            enable_thinking=False if args.no_thinking else None,
            preserve_thinking=True if args.preserve_thinking else None,
        )
        seed = None if args.seed is None else args.seed + turn
        params = SamplingParams(**defaults, seed=seed)
        thinking = opens_thinking(tokenizer, ids)
        printer = _ReplyPrinter(thinking)
        completion = None
        try:
            for delta in stream(
                engine,
                tokenizer,
                ids,
                params,
                max_new_tokens=args.max_new_tokens,
                num_speculative_tokens=args.speculative_tokens,
                vision=vision,
            ):
                printer.write(delta.text)
                completion = delta.completion
        except KeyboardInterrupt:
            printer.close()
            print("[interrupted: this turn is not kept]", file=sys.stderr)
            continue
        printer.close()
        turn += 1
        if completion.finish_reason == "length":
            print(f"[reply cut at {args.max_new_tokens} tokens]", file=sys.stderr)
        reply = parse_reply(completion.text, thinking_open=thinking)
        assistant = {"role": "assistant", "content": reply["content"]}
        if reply["reasoning"]:
            assistant["reasoning_content"] = reply["reasoning"]
        history = [*messages, assistant]
