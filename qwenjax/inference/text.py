"""The text layer between `Engine` (token ids) and users (strings): stop strings, streaming
detokenization, batched completions and chat prompts.

    complete     prompts (strings or ids) → `Completion`s: text, ids, finish reason, logprobs
    stream       one prompt → `Delta`s of final text as the device loop produces tokens
    chat_prompt  a conversation → prompt ids, rendered with the checkpoint's chat template
    chat_inputs  the same for conversations with images and videos: ids with the pads expanded,
                 and the pixel inputs (`VisionInputs`) to pass along with them

Semantics follow the OpenAI / vLLM APIs:

* A stop string ends the generation at the first token whose text completes it; the output text
  is cut just BEFORE its earliest occurrence (the stop string is not included) and the finish
  reason is "stop". Stop strings are searched in the decoded text after every token, so
  `complete` and `stream` cut at the same place whatever the streaming chunk.
* A stop token (the tokenizer's EOS ids unless `ignore_eos`, plus `stop_token_ids`) ends the
  generation with "stop" too; it is kept in `token_ids` (and its logprob) but not in the text.
* Text is decoded with `skip_special_tokens=True` by default (vLLM's default). Qwen's `<think>`,
  `</think>` and `<tool_call>` are not special tokens, so a reply still parses with `parse_reply`.
* Streaming emits only final text: a trailing incomplete UTF-8 sequence ("\\ufffd") and a suffix
  that could still become a stop string are held back, so the concatenated deltas equal the
  `complete` text exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from qwenjax.inference.engine import Engine
from qwenjax.inference.sampling import SamplingParams
from qwenjax.tokenizer import Tokenizer
from qwenjax.vision.model import VisionInputs
from qwenjax.vision.processor import Processor, extract_media

# Prompt tokens decoded in front of the output, so that a SentencePiece word-start piece keeps its
# space (decoding on its own would strip it) and byte-level merges see their neighbours.
_CONTEXT_TOKENS = 4
_REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence
# With stop strings, `complete` checks them every this many decode-loop iterations, so a batch
# whose rows all hit a stop string stops early instead of running to max_new_tokens.
STOP_CHECK_INTERVAL = 16

Prompt = str | Sequence[int]


# ----------------------------------------------------------------------------------------------
# Stop strings
# ----------------------------------------------------------------------------------------------


def find_stop(text: str, stop: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest occurrence of any stop string in `text[start:]` → (index, stop string).

    Among stop strings starting at the same index the shortest wins (it completes first).
    """
    best: tuple[int, str] | None = None
    for s in stop:
        i = text.find(s, start)
        if i >= 0 and (best is None or (i, len(s)) < (best[0], len(best[1]))):
            best = (i, s)
    return best


def partial_stop_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string: the
    part a stream must hold back, because the next token may complete the stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


# ----------------------------------------------------------------------------------------------
# Incremental detokenization
# ----------------------------------------------------------------------------------------------


class TextDecoder:
    """One output's token ids in, final text out, with stop strings and stop tokens applied.

    `push(token_id)` returns the text that became final with that token (often ""), `finish()`
    the rest at the end of the generation. After a stop (`finish_reason == "stop"`) no more
    tokens are taken. The concatenation of everything returned is `text`.

    Decoding is incremental (as in vLLM): only a window of recent tokens is decoded per token,
    starting at a token boundary where the text was known to end on a complete character.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        prompt_ids: Sequence[int] = (),
        stop: Sequence[str] | None = (),
        stop_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stop = tuple(stop or ())
        self._stop_ids = frozenset(int(t) for t in stop_token_ids)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        context = [int(t) for t in prompt_ids[-_CONTEXT_TOKENS:]] if prompt_ids else []
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []  # a prompt ending mid-character: its text is not a prefix of the next
        self._ids = context
        self._prefix = 0  # window start: the text of ids[:_prefix] is final
        self._read = len(context)  # window tokens before this are already in `_text`
        self._prefix_text = self._decode(context)
        self._text = ""  # decoded output text (cut at a stop string once one is found)
        self._searched = 0  # stop strings were searched in _text[:_searched]
        self._emitted = 0
        self.num_tokens = 0  # output tokens taken, a final stop token included
        self.finish_reason: str | None = None  # "stop" / "length" once finished
        self.stop_reason: str | int | None = None  # the stop string or stop token id that hit

    @property
    def text(self) -> str:
        """The text returned so far."""
        return self._text[: self._emitted]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Take one generated token; return the text that became final."""
        if self.finished:
            raise ValueError(f"this output already finished ({self.finish_reason})")
        self.num_tokens += 1
        token_id = int(token_id)
        if token_id in self._stop_ids:
            self.stop_reason = token_id
            return self._end("stop")
        self._ids.append(token_id)
        self._advance(final=False)
        self._check_stop()
        return self._release()

    def finish(self, reason: str = "length") -> str:
        """End the output (`reason` unless a stop already ended it); return the held-back text."""
        return "" if self.finished else self._end(reason)

    def _end(self, reason: str) -> str:
        self._advance(final=True)
        self._check_stop()
        if self.finish_reason is None:
            self.finish_reason = reason
        return self._release()

    def _advance(self, *, final: bool) -> None:
        """Move the window's new text into `_text` unless it ends mid-character."""
        window = self._decode(self._ids[self._prefix :])
        if len(window) > len(self._prefix_text) and (final or not window.endswith(_REPLACEMENT)):
            self._text += window[len(self._prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])

    def _check_stop(self) -> None:
        if not self._stop or self.finished:
            return
        hit = find_stop(self._text, self._stop, max(0, self._searched - self._max_stop + 1))
        self._searched = len(self._text)
        if hit is not None:
            self._text = self._text[: hit[0]]
            self.finish_reason, self.stop_reason = "stop", hit[1]

    def _release(self) -> str:
        end = len(self._text)
        if not self.finished:
            end = max(self._emitted, end - partial_stop_length(self._text, self._stop))
        delta, self._emitted = self._text[self._emitted : end], end
        return delta


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated output.

    `token_ids` are the tokens the text came from: up to and including a stop token, or up to the
    token that completed a stop string. `logprobs` (when the request asked for them) has one entry
    per token id: `{"token_id", "token", "logprob", "top_logprobs": [{"token_id", "token",
    "logprob"}, ...]}`, raw log-probabilities before any sampling filter.
    """

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    stop_reason: str | int | None  # the stop string / stop token id that ended it
    prompt_tokens: int
    logprobs: list[dict[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class Delta:
    """A piece of streamed text; the last one has `finish_reason` and the whole `completion`."""

    text: str
    finish_reason: str | None = None
    completion: Completion | None = None


def _stop_ids(params: SamplingParams, tokenizer: Tokenizer) -> tuple[int, ...]:
    eos = () if params.ignore_eos else tokenizer.eos_token_ids
    return tuple(dict.fromkeys((*params.stop_token_ids, *eos)))


def _encode(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    return tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]


class _Run:
    """A batch on the device plus one `TextDecoder` per row, advanced chunk by chunk."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        prompts: Sequence[Prompt],
        params: Sequence[SamplingParams],
        *,
        max_new_tokens: int,
        num_speculative_tokens: int,
        default_seed: int | None,
        skip_special_tokens: bool,
        num_top_logprobs: int | None = None,
        vision: Sequence[VisionInputs | None] | None = None,
    ):
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        for i, p in enumerate(params):
            try:
                p.validate(engine.config.vocab_size)
            except ValueError as e:
                raise ValueError(f"request {i}: {e}") from e
        self.tokenizer = tokenizer
        self.engine = engine
        self.params = list(params)
        self.prompt_ids = [_encode(tokenizer, p) for p in prompts]
        # EOS is a per-row stop token, so that `ignore_eos` can differ between rows.
        rows = [dataclasses.replace(p, stop_token_ids=_stop_ids(p, tokenizer)) for p in params]
        self.decoders = [
            TextDecoder(
                tokenizer,
                prompt_ids=ids,
                stop=p.stop,
                stop_token_ids=p.stop_token_ids,
                skip_special_tokens=skip_special_tokens,
            )
            for ids, p in zip(self.prompt_ids, rows, strict=True)
        ]
        num_top = max((p.top_logprobs or 0) if p.logprobs else 0 for p in params)
        if num_top_logprobs is not None:
            if num_top_logprobs < num_top:
                raise ValueError(f"num_top_logprobs={num_top_logprobs} < top_logprobs={num_top}")
            num_top = num_top_logprobs
        self.state, self.req, self.opts = engine.start(
            self.prompt_ids,
            rows,
            max_new_tokens=max_new_tokens,
            num_top_logprobs=num_top,
            num_speculative_tokens=num_speculative_tokens,
            pad_id=tokenizer.pad_id,
            default_seed=default_seed,
            vision=None if vision is None else VisionInputs.concat(vision),
        )
        self.iterations = 0
        self.tokens = np.zeros((len(rows), 0), np.int32)

    @property
    def finished(self) -> bool:
        return all(d.finished for d in self.decoders)

    def step(self, iterations: int) -> None:
        """Run up to `iterations` more decode-loop iterations on the device."""
        self.iterations = min(self.iterations + iterations, self.opts.max_new_tokens)
        self.state = self.engine.step(self.state, self.req, self.opts, self.iterations)

    def poll(self) -> list[str]:
        """Feed the rows' new tokens to their decoders → the new final text of each row."""
        self.tokens = np.asarray(self.state.tokens)
        num_out = np.asarray(self.state.num_out)
        done = np.asarray(self.state.done)
        deltas = []
        for b, d in enumerate(self.decoders):
            parts = []
            while not d.finished and d.num_tokens < num_out[b]:
                parts.append(d.push(self.tokens[b, d.num_tokens]))
            # The device ran out of room for the row (a stop token would have finished it).
            if not d.finished and (done[b] or self.iterations >= self.opts.max_new_tokens):
                parts.append(d.finish("length"))
            deltas.append("".join(parts))
        return deltas

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.decode([token_id])
        return {"token_id": token_id, "token": text, "logprob": logprob}

    def results(self) -> list[Completion]:
        want = [p.logprobs for p in self.params]
        gen = self.engine.finish(self.state, self.opts) if any(want) else None
        out = []
        for b, d in enumerate(self.decoders):
            ids = [int(t) for t in self.tokens[b, : d.num_tokens]]
            logprobs = None
            if gen is not None and want[b]:
                k = self.params[b].top_logprobs or 0
                logprobs = []
                for i, t in enumerate(ids):
                    entry = self._token(t, float(gen.logprobs[b, i]))
                    top_ids, top_lps = gen.top_logprobs or (None, None)
                    entry["top_logprobs"] = [
                        self._token(int(top_ids[b, i, j]), float(top_lps[b, i, j]))
                        for j in range(k)
                    ]
                    logprobs.append(entry)
            out.append(
                Completion(
                    text=d.text,
                    token_ids=ids,
                    finish_reason=d.finish_reason or "length",
                    stop_reason=d.stop_reason,
                    prompt_tokens=len(self.prompt_ids[b]),
                    logprobs=logprobs,
                )
            )
        return out


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def complete(
    engine: Engine,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    params: Sequence[SamplingParams] | SamplingParams,
    *,
    max_new_tokens: int,
    num_speculative_tokens: int = 0,
    default_seed: int | None = None,
    skip_special_tokens: bool = True,
    num_top_logprobs: int | None = None,
    stop_check_interval: int = STOP_CHECK_INTERVAL,
    vision: Sequence[VisionInputs | None] | None = None,
) -> list[Completion]:
    """Generate for a batch of prompts (strings are encoded; id lists are used as they are).

    `params` is one `SamplingParams` per prompt (or one for all). Each row generates at most
    `min(max_tokens, max_new_tokens)` tokens, where `max_new_tokens` sizes the device buffers
    (one compiled program per distinct value). Without stop strings the whole decode loop runs
    in one device call; with them the host checks every `stop_check_interval` iterations and
    stops once every row has finished. `num_top_logprobs` (default: the largest `top_logprobs`
    requested) fixes the compiled top-logprobs width, so batches asking for different numbers
    can share one program. `vision` gives each prompt's images and videos (None: text), as
    `chat_inputs` returns them.
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    run = _Run(
        engine,
        tokenizer,
        prompts,
        params,
        max_new_tokens=max_new_tokens,
        num_speculative_tokens=num_speculative_tokens,
        default_seed=default_seed,
        skip_special_tokens=skip_special_tokens,
        num_top_logprobs=num_top_logprobs,
        vision=vision,
    )
    chunk = stop_check_interval if any(p.stop for p in params) else max_new_tokens
    run.poll()
    while not run.finished:
        run.step(chunk)
        run.poll()
    return run.results()


def stream(
    engine: Engine,
    tokenizer: Tokenizer,
    prompt: Prompt,
    params: SamplingParams,
    *,
    max_new_tokens: int,
    chunk: int = 1,
    num_speculative_tokens: int = 0,
    default_seed: int | None = None,
    skip_special_tokens: bool = True,
    vision: VisionInputs | None = None,
) -> Iterator[Delta]:
    """Generate for one prompt, yielding final text as it appears.

    Every `chunk` decode-loop iterations (one token each, up to k + 1 with speculative decoding)
    the new tokens are decoded; non-empty text is yielded as a `Delta`. The last `Delta` carries
    the finish reason and the `Completion` (its text is the concatenation of all deltas). The
    loop stops as soon as a stop string appears. `vision`: the prompt's images and videos.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    run = _Run(
        engine,
        tokenizer,
        [prompt],
        [params],
        max_new_tokens=max_new_tokens,
        num_speculative_tokens=num_speculative_tokens,
        default_seed=default_seed,
        skip_special_tokens=skip_special_tokens,
        vision=[vision],
    )
    while True:
        (text,) = run.poll()
        if run.finished:
            result = run.results()[0]
            yield Delta(text, finish_reason=result.finish_reason, completion=result)
            return
        if text:
            yield Delta(text)
        run.step(chunk)


def chat_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    enable_thinking: bool | None = None,
    preserve_thinking: bool | None = None,
) -> list[int]:
    """Prompt ids of a conversation, ending with the assistant generation prompt."""
    if extract_media(messages)[1]:
        raise ValueError("the messages hold images or videos: use chat_inputs")
    return tokenizer.encode(_render(tokenizer, messages, tools, enable_thinking, preserve_thinking))


def _render(tokenizer: Tokenizer, messages, tools, enable_thinking, preserve_thinking) -> str:
    return tokenizer.apply_chat_template(
        messages,
        tools,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
        preserve_thinking=preserve_thinking,
    )


def chat_inputs(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    processor: Processor | None = None,
    enable_thinking: bool | None = None,
    preserve_thinking: bool | None = None,
) -> tuple[list[int], VisionInputs | None]:
    """`chat_prompt` for conversations that may hold images and videos (content parts, see
    `qwenjax.vision.processor`): the prompt ids with every image / video pad expanded to its
    tokens, and the pixel inputs for `complete` / `stream` / `Engine.start` (None: text only).
    `processor` (default: the published Qwen3.6 settings) sets the pixel budget.
    """
    messages, media = extract_media(messages)
    text = _render(tokenizer, messages, tools, enable_thinking, preserve_thinking)
    processor = Processor() if processor is None else processor
    inputs, timestamps = processor.load(media)
    return tokenizer.encode(processor.expand(text, inputs, timestamps)), inputs


def opens_thinking(tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> bool:
    """Whether a chat prompt ends inside an open `<think>` block (thinking on): the reply then
    starts with reasoning (`parse_reply(..., thinking_open=True)`)."""
    tail = tokenizer.decode(list(prompt_ids[-_CONTEXT_TOKENS:]), skip_special_tokens=False)
    return tail.rstrip().endswith("<think>")
