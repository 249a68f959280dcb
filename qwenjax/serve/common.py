"""What the OpenAI and Anthropic routes share: server state, errors, request-field checks, SSE
framing, and `Generation` — one output of one request, from scheduler events to parsed text.

`Generation` owns the text side of a request (the scheduler only moves token ids): it decodes
tokens incrementally with `TextDecoder` (stop strings are applied here and cancel the request
when one hits), feeds the text to a `ReplyParser`, collects logprobs, enforces a thinking budget,
gives the scheduler its grammar (`response_format`) and records latency metrics. Streaming
routes turn its chunks into SSE events; non-streaming routes collect the same chunks, so both
see exactly the same text and parse.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from qwenjax.inference.sampling import SamplingParams
from qwenjax.inference.text import TextDecoder
from qwenjax.serve.grammar import Grammar, Grammars
from qwenjax.serve.metrics import Metrics
from qwenjax.serve.scheduler import QueueFull
from qwenjax.serve.stream_parser import Event, Parsed, ReplyParser, collect, merge_events

log = logging.getLogger("qwenjax.serve")

# What closes a reasoning block: the tag the engine forces when a thinking budget is spent, and
# the text the template writes after an assistant turn's reasoning.
THINK_CLOSE = "</think>"
THINK_END = "\n</think>\n\n"
RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    """A request the server refuses; each API renders it in its own error envelope.

    kind: "invalid_request" (400), "authentication" (401), "not_found" (404), "overloaded"
    (OpenAI 429 / Anthropic 529), "server" (500).
    """

    def __init__(
        self, kind: str, message: str, *, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.kind, self.message, self.param, self.code = kind, message, param, code


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError("invalid_request", message, param=param)


@dataclasses.dataclass
class ServerState:
    """Everything a route needs; built once by `app.build_app`."""

    scheduler: Any  # qwenjax.serve.scheduler.Scheduler (or a test double with its interface)
    tokenizer: Any  # qwenjax.tokenizer.Tokenizer
    model_name: str
    max_length: int
    vocab_size: int
    api_key: str | None = None
    enable_test_hooks: bool = False
    sampling_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # qwenjax.vision.processor.Processor when the model has a vision tower (images accepted)
    processor: Any = None
    max_images: int | None = None  # images per request at most (--max-images); None: any
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    metrics: Metrics = None  # type: ignore[assignment]
    grammars: Grammars = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = Metrics(self.scheduler.stats)
        if self.grammars is None:
            self.grammars = Grammars(self.tokenizer, self.vocab_size)


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


# ---------------------------------------------------------------------------- request fields
def _type_name(kinds: tuple[type, ...]) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def field(
    body: Mapping[str, Any],
    name: str,
    kinds: type | tuple[type, ...],
    default: Any = None,
    *,
    required: bool = False,
    prefix: str = "",
) -> Any:
    """`body[name]` checked against JSON types (null = absent); `invalid` naming the field."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    value = body.get(name)
    if value is None:
        if required:
            raise invalid(f"'{prefix}{name}' is required", prefix + name)
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise invalid(
            f"'{prefix}{name}' must be {_type_name(kinds)}, got {json.dumps(value)[:100]}",
            prefix + name,
        )
    return value


def check_unknown(body: Mapping[str, Any], known: set[str], ignored: set[str], route: str) -> None:
    """Fields the API defines but this server does not implement are logged and ignored;
    fields it does not define are a 400 (a typo should not silently change nothing)."""
    unknown = sorted(set(body) - known - ignored)
    if unknown:
        raise invalid(f"unknown field '{unknown[0]}' for {route}", unknown[0])
    skipped = sorted(k for k in set(body) & ignored if body[k] is not None)
    if skipped:
        log.info("%s: ignoring fields this server does not implement: %s", route, skipped)


def sampling_params(
    state: ServerState, values: Mapping[str, Any], *, param_names: Mapping[str, str] | None = None
) -> SamplingParams:
    """SamplingParams from request values (OpenAI names) over the checkpoint's defaults,
    validated; a bad value is a 400 naming the request field."""
    merged = {**state.sampling_defaults, **{k: v for k, v in values.items() if v is not None}}
    try:
        params = SamplingParams(**merged)
        return params.validate(state.vocab_size)
    except (TypeError, ValueError) as e:
        message = str(e)
        name = message.split()[0] if message else None
        names = {f.name for f in dataclasses.fields(SamplingParams)}
        if name not in names:
            name = next((n for n in values if n in message), None)
        param = (param_names or {}).get(name, name) if name else None
        raise invalid(message, param) from None


def fit_max_tokens(state: ServerState, prompt_len: int, requested: int | None, param: str) -> int:
    """The token budget of a request: the request's, cut to what the context has room for (a
    client asking for more than fits gets a shorter reply with finish reason "length", not an
    error); a prompt that leaves no room is a 400."""
    room = state.max_length - prompt_len
    if room < 1:
        raise invalid(
            f"the prompt has {prompt_len} tokens, but this server's context (--max-length) is "
            f"{state.max_length} tokens, which leaves no room for a reply",
            param,
        )
    if requested is not None and requested > room:
        log.info("max tokens %d cut to %d, the room the context leaves", requested, room)
    return room if requested is None else min(requested, room)


def render_chat(
    state: ServerState,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    *,
    enable_thinking: bool | None,
    preserve_thinking: bool | None,
    template_kwargs: Mapping[str, Any] | None = None,
    param: str = "messages",
) -> str:
    """The prompt text, rendered with the checkpoint's template (a template error is a 400)."""
    extra = dict(template_kwargs or {})
    if extra and state.tokenizer.chat_template is None:
        log.info("chat_template_kwargs %s ignored: the built-in renderer has none", sorted(extra))
        extra = {}
    try:
        return state.tokenizer.apply_chat_template(
            messages,
            tools,
            add_generation_prompt=True,
            enable_thinking=enable_thinking,
            preserve_thinking=preserve_thinking,
            **extra,
        )
    except Exception as e:  # template errors: ChatTemplateError, TypeError, jinja2 errors
        raise invalid(
            f"cannot render the conversation with the chat template: {e}", param
        ) from None


def forced_tokens(state: ServerState, body: Mapping[str, Any]) -> list[int] | None:
    """The test hook: `qwenjax_forced_tokens` (ids) or `qwenjax_forced_text` scripts the output
    (through the real engine), only on a server started with --enable-test-hooks."""
    ids, text = body.get("qwenjax_forced_tokens"), body.get("qwenjax_forced_text")
    if ids is None and text is None:
        return None
    if not state.enable_test_hooks:
        name = "qwenjax_forced_tokens" if ids is not None else "qwenjax_forced_text"
        raise invalid(f"unknown field '{name}'", name)
    if text is not None:
        return state.tokenizer.encode(str(text))
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise invalid(
            "'qwenjax_forced_tokens' must be a list of token ids", "qwenjax_forced_tokens"
        )
    return ids


TEST_HOOK_FIELDS = {"qwenjax_forced_tokens", "qwenjax_forced_text"}


# ---------------------------------------------------------------------------- SSE
def sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def merge(iterators: Sequence[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(index, item) from several async iterators as items arrive (n > 1 choices)."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[Any]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
                if tasks[i].done() and tasks[i].exception() is not None:
                    raise tasks[i].exception()
                continue
            yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def keepalive(it: AsyncIterator[Any], interval: float) -> AsyncIterator[Any]:
    """The items of `it`, and None whenever `interval` seconds pass without one (a stream's
    cue to send a keep-alive event). The pending `__anext__` survives the timeouts, so the
    underlying generator is never interrupted mid-step."""
    ait = it.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(ait.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()


async def wait_or_disconnect(receive: Any, work: Any, on_disconnect: Any) -> Any:
    """Await `work` (a coroutine); if the client disconnects first, run `on_disconnect()` (which
    cancels the generations) and raise `asyncio.CancelledError`."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        on_disconnect()
        task.cancel()
        raise asyncio.CancelledError("client disconnected")
    return task.result()


# ---------------------------------------------------------------------------- generation
@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Chunk:
    """What one scheduler event became: final text, its parse, and the consumed tokens."""

    text: str = ""
    events: list[Event] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort"


class Generation:
    """One output of one request: submit it, then iterate its `Chunk`s (the last one has the
    finish reason), or `collect()` them.

    Args:
        prompt_ids: The rendered prompt.
        params: Validated sampling parameters with `max_tokens` set.
        thinking_open: The prompt ends inside `<think>` (the reply starts in reasoning).
        tools / parse_tool_calls: For the reply parser.
        prefill_text: Text the prompt already holds of the reply (a forced tool-call opening);
            it is fed to the parser first, so the reply parses as if the model had written it.
        thinking_budget: Output tokens allowed before `</think>`: the engine forces that token
            once they are spent without one (only when the reply starts in reasoning), so the
            model has to answer.
        grammar: The reply's content must match it (`response_format`); it starts after
            `</think>` when the reply starts in reasoning.
        forced: The test hook's scripted tokens.
        vision: The prompt's images (`VisionInputs`), None for text.
    """

    def __init__(
        self,
        state: ServerState,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        start: float,
        thinking_open: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        parse_tool_calls: bool = False,
        prefill_text: str = "",
        thinking_budget: int | None = None,
        grammar: Grammar | None = None,
        forced: list[int] | None = None,
        skip_special_tokens: bool = True,
        vision: Any = None,
    ):
        self.state = state
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.start = start
        self.parser = ReplyParser(
            thinking_open=thinking_open, tools=tools, parse_tool_calls=parse_tool_calls
        )
        self._initial_events = self.parser.feed(prefill_text) if prefill_text else []
        self.thinking_budget = thinking_budget
        self.grammar = grammar
        self.forced = forced
        self.vision = vision
        self._skip_special = skip_special_tokens
        self.decoder = self._decoder(self.prompt_ids)
        self.handle: Any = None
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens the engine reused from its cache
        self.reasoning_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.result = Parsed()
        self.text = ""
        self.chunks_seen: list[Chunk] = []
        self._last_token_time: float | None = None
        self._cancelled = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def _decoder(self, context: Sequence[int]) -> TextDecoder:
        eos = () if self.params.ignore_eos else self.state.tokenizer.eos_token_ids
        return TextDecoder(
            self.state.tokenizer,
            prompt_ids=context,
            stop=self.params.stop,
            stop_token_ids=(*self.params.stop_token_ids, *eos),
            skip_special_tokens=self._skip_special,
        )

    def submit(self) -> None:
        """Queue the request; raises ApiError (overloaded / invalid) when the scheduler refuses."""
        kwargs: dict[str, Any] = {}
        if self.forced is not None:
            kwargs["forced_tokens"] = self.forced
        if self.vision is not None:
            kwargs["vision"] = self.vision
        end = self.state.tokenizer.token_to_id(THINK_CLOSE)
        if self.grammar is not None:  # from `</think>` on when the reply opens in reasoning
            start = end if self.parser.in_reasoning else None
            kwargs["constraint"] = self.grammar.constraint(start)
        if self.thinking_budget is not None and self.parser.in_reasoning:
            if end is None:
                log.warning(
                    "no %s token in the vocabulary: the thinking budget is ignored", THINK_CLOSE
                )
            else:
                kwargs["reasoning_budget"] = (end, self.thinking_budget)
        try:
            self.handle = self.state.scheduler.submit(self.prompt_ids, self.params, **kwargs)
        except QueueFull:
            self.state.metrics.rejected.labels("queue_full").inc()
            raise ApiError(
                "overloaded", "the server is busy (its request queue is full); retry shortly"
            ) from None
        except ValueError as e:
            raise invalid(str(e)) from None
        except RuntimeError as e:  # the engine loop died
            raise ApiError("server", str(e)) from None

    def cancel(self) -> None:
        self._cancelled = True
        if self.handle is not None:
            self.handle.cancel()

    def _observe(self, count: int) -> None:
        now = time.perf_counter()
        self.state.metrics.observe_tokens(self.start, self._last_token_time, now, count)
        self._last_token_time = now

    def _take(self, token_id: int, ev: Any, j: int, chunk: Chunk) -> None:
        """One output token into the decoder and the parser."""
        piece = self.decoder.push(token_id)
        self.completion_tokens += 1
        chunk.token_ids.append(token_id)
        if self.params.logprobs and ev.logprobs is not None:
            top = ev.top_logprobs[j] if ev.top_logprobs is not None else []
            chunk.logprobs.append(TokenLogprob(token_id, float(ev.logprobs[j]), list(top)))
        self._text(piece, chunk)
        if self.parser.in_reasoning:
            self.reasoning_tokens += 1

    def _text(self, piece: str, chunk: Chunk) -> None:
        if piece:
            chunk.text += piece
            chunk.events += self.parser.feed(piece)

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The output as it is generated; the last chunk has `finish_reason`. The parse so far
        is in `result`, the text in `text`."""
        async for chunk in self._chunks():
            chunk.events = merge_events(chunk.events)
            collect(chunk.events, self.result)
            self.text += chunk.text
            yield chunk

    async def _chunks(self) -> AsyncIterator[Chunk]:
        if self._initial_events:
            yield Chunk(events=self._initial_events)
        try:
            async for ev in self.handle:
                self.cached_tokens = getattr(ev, "cached_tokens", 0)
                self._observe(len(ev.token_ids))
                chunk = Chunk()
                for j, token_id in enumerate(ev.token_ids):
                    self._take(int(token_id), ev, j, chunk)
                    if self.decoder.finished:
                        break
                if self.decoder.finished:  # a stop string or stop token
                    self.handle.cancel()
                    self.stop_reason = self.decoder.stop_reason
                    yield self._finish(chunk, self.decoder.finish_reason)
                    return
                if ev.finish_reason is not None:
                    reason = "abort" if self._cancelled else ev.finish_reason
                    self._text(self.decoder.finish(reason), chunk)
                    yield self._finish(chunk, self.decoder.finish_reason or reason)
                    return
                if chunk.text or chunk.events or chunk.logprobs or chunk.token_ids:
                    yield chunk
            yield self._finish(Chunk(), "abort")  # the events ended without a last one
        finally:
            if self.finish_reason is None:  # the consumer went away (client disconnect)
                self.cancel()

    def _finish(self, chunk: Chunk, reason: str) -> Chunk:
        chunk.events += self.parser.finish()
        chunk.finish_reason = self.finish_reason = reason
        now = time.perf_counter()
        metrics = self.state.metrics
        metrics.e2e.observe(now - self.start)
        metrics.success.labels(reason).inc()
        return chunk

    async def collect(self) -> list[Chunk]:
        """All chunks (non-streaming), also kept in `chunks_seen`."""
        self.chunks_seen = [chunk async for chunk in self.chunks()]
        return self.chunks_seen


def submit_all(generations: Sequence[Generation]) -> None:
    """Submit every output of a request, or none: a refusal cancels those already queued."""
    try:
        for g in generations:
            g.submit()
    except ApiError:
        for g in generations:
            if g.handle is not None:
                g.handle.cancel()
        raise
