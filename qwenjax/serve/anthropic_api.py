"""The Anthropic Messages routes: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Tools configured with an Anthropic base URL (the server root) work unchanged: the request is
converted to chat messages for the checkpoint's template, and the reply parser's events become
`thinking`, `text` and `tool_use` content blocks, streamed with Anthropic's event sequence
(`message_start`, `ping`, `content_block_start` / `_delta` / `_stop`, `message_delta`,
`message_stop`). Choices made here (SERVING.md §4):

* Any model name is served by the one loaded model (clients send their own names); the mapping
  is logged once per name.
* What real clients add and this server does not use is tolerated with a log line: unknown
  top-level fields (`betas`, `metadata`, `container`, ...), `cache_control` on blocks, unknown
  block types. `image` blocks in user messages with a base64 source are taken when the model has
  a vision tower (`media`; a `url` source is a 400: nothing is fetched); documents are a 400.
* No `thinking` field, or `{"type": "disabled"}`, renders the prompt with thinking off;
  `{"type": "enabled", "budget_tokens": N}` turns it on and caps it: after N reasoning tokens
  the request is continued with `</think>` appended, so the model has to answer (see
  `common.Generation`). `{"type": "adaptive"}` turns thinking on without a cap. Thinking blocks
  carry an empty `signature`: this server has nothing to sign with, and an invented value that
  looks real would mislead.
* `tool_choice` `any` / `tool` start the reply with the call's opening tags (no constrained
  decoding); like Anthropic's API, they cannot be combined with thinking.
* `max_tokens` beyond the room the context leaves is cut to it (stop reason `max_tokens`).
* Overload (the queue is full) is `529 overloaded_error`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from qwenjax.serve import media
from qwenjax.serve import stream_parser as sp
from qwenjax.serve.common import (
    SSE_HEADERS,
    TEST_HOOK_FIELDS,
    ApiError,
    Generation,
    ServerState,
    field,
    fit_max_tokens,
    forced_tokens,
    invalid,
    keepalive,
    log,
    new_id,
    sampling_params,
    sse,
    submit_all,
)
from qwenjax.serve.openai_api import collect_all, merge_leading_system, prepare_chat, read_body

_KNOWN = {
    "model",
    "messages",
    "max_tokens",
    "system",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "stream",
    "thinking",
    "tools",
    "tool_choice",
    "chat_template_kwargs",
}
_ERROR_STATUS = {
    "invalid_request": 400,
    "authentication": 401,
    "not_found": 404,
    "overloaded": 529,
    "server": 500,
}
_ERROR_TYPE = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "not_found": "not_found_error",
    "overloaded": "overloaded_error",
    "server": "api_error",
}
# Seconds without output after which a stream sends a `ping` (a long prefill or a queue wait).
PING_INTERVAL = 10.0
_seen_models: set[str] = set()


def error_body(e: ApiError) -> dict[str, Any]:
    message = e.message if e.param is None else f"{e.param}: {e.message}"
    return {"type": "error", "error": {"type": _ERROR_TYPE[e.kind], "message": message}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=_ERROR_STATUS[e.kind])


def _log_model(state: ServerState, model: str) -> None:
    if model != state.model_name and model not in _seen_models:
        _seen_models.add(model)
        log.info("/v1/messages: model %r is served by %r", model, state.model_name)


def _block_text(block: Mapping[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise invalid(f"'{where}.text' must be a string", where)
    return text


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid(f"'{where}' must be a string or an array of content blocks", where)
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid(f"'{where}[{i}]' must be a content block with a 'type'", f"{where}[{i}]")
    return content


def _tool_result_text(block: Mapping[str, Any], where: str) -> str:
    content = block.get("content", "")
    if isinstance(content, str):
        text = content
    else:
        parts = []
        for i, item in enumerate(_blocks(content, where + ".content")):
            if item["type"] == "text":
                parts.append(_block_text(item, f"{where}.content[{i}]"))
            elif item["type"] in ("image", "document"):
                raise invalid(
                    f"'{where}.content[{i}]': {item['type']} blocks in tool results are not "
                    "supported",
                    where,
                )
            else:
                log.info("/v1/messages: ignoring a %r block in a tool result", item["type"])
        text = "\n".join(parts)
    return ("Error: " + text) if block.get("is_error") else text


def _messages(state: ServerState, body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Anthropic system + messages → chat messages for the template (images decoded)."""
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        blocks = _blocks(system, "system")
        texts = [
            _block_text(b, f"system[{i}]") for i, b in enumerate(blocks) if b["type"] == "text"
        ]
        if texts:
            out.append({"role": "system", "content": "\n\n".join(texts)})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("'messages' must be a non-empty array", "messages")
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"'{where}' must be an object", where)
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise invalid(
                f"'{where}.role' must be 'user' or 'assistant', got {json.dumps(role)}",
                f"{where}.role",
            )
        texts, thinking, calls, parts = [], [], [], []
        for j, block in enumerate(_blocks(m.get("content"), f"{where}.content")):
            bw = f"{where}.content[{j}]"
            kind = block["type"]
            if kind == "text":
                texts.append(_block_text(block, bw))
                parts.append({"type": "text", "text": texts[-1]})
            elif kind == "image" and role == "user":
                parts.append(media.anthropic_image_part(state, block, bw))
            elif kind == "tool_result" and role == "user":
                out.append(
                    {
                        "role": "tool",
                        "content": _tool_result_text(block, bw),
                        "tool_call_id": block.get("tool_use_id"),
                    }
                )
            elif kind == "tool_use" and role == "assistant":
                name, args = block.get("name"), block.get("input", {})
                if not isinstance(name, str) or not isinstance(args, dict):
                    raise invalid(f"'{bw}' needs a 'name' and an object 'input'", bw)
                calls.append(
                    {
                        "id": block.get("id"),
                        "type": "function",
                        "function": {"name": name, "arguments": args},
                    }
                )
            elif kind == "thinking" and role == "assistant":
                if isinstance(block.get("thinking"), str):
                    thinking.append(block["thinking"])
            elif kind == "image":
                media.require_images(state, bw)
                raise invalid(f"'{bw}': images are accepted in user messages only", bw)
            elif kind == "document":
                raise invalid(f"'{bw}': document blocks are not supported", bw)
            else:
                log.info("/v1/messages: ignoring a %r block in a %s message", kind, role)
        if role == "user":
            if len(parts) > len(texts):  # images, in block order among the texts
                out.append({"role": "user", "content": parts})
            elif texts:
                out.append({"role": "user", "content": "\n\n".join(texts)})
            continue
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if thinking:
            message["reasoning_content"] = "\n\n".join(thinking)
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return merge_leading_system(out)


def _tools(raw: Any) -> list[dict[str, Any]] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise invalid("'tools' must be an array", "tools")
    out = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise invalid(f"'{where}' must be an object", where)
        if tool.get("type") not in (None, "custom"):
            log.info("/v1/messages: ignoring the server tool %r", tool.get("type"))
            continue
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"'{where}.name' is required", f"{where}.name")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise invalid(
                f"'{where}.input_schema' must be a JSON schema of type 'object'",
                f"{where}.input_schema",
            )
        entry = {"name": name, "parameters": schema}
        if isinstance(tool.get("description"), str):
            entry["description"] = tool["description"]
        out.append({"type": "function", "function": entry})
    return out or None


def _tool_choice(raw: Any, tools: list[dict[str, Any]] | None) -> Any:
    if raw is None:
        return "auto"
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "auto":
        return "auto"
    if kind == "none":
        return "none"
    if kind == "any":
        if not tools:
            raise invalid("tool_choice 'any' needs tools", "tool_choice")
        return "required"
    if kind == "tool":
        name = raw.get("name")
        if name not in [t["function"]["name"] for t in tools or ()]:
            raise invalid(
                f"tool_choice names the tool {name!r}, which is not in tools", "tool_choice"
            )
        return {"name": name}
    raise invalid("'tool_choice.type' must be auto, any, tool or none", "tool_choice")


def _thinking(body: Mapping[str, Any]) -> tuple[bool, int | None]:
    """(thinking on, reasoning token budget)."""
    raw = body.get("thinking")
    if raw is None:
        return False, None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "disabled":
        return False, None
    if kind == "adaptive":
        return True, None
    if kind != "enabled":
        raise invalid("'thinking.type' must be 'enabled', 'disabled' or 'adaptive'", "thinking")
    budget = field(raw, "budget_tokens", int, required=True, prefix="thinking.")
    if budget < 1:
        raise invalid("'thinking.budget_tokens' must be >= 1", "thinking.budget_tokens")
    return True, budget


@dataclasses.dataclass
class _Prepared:
    prompt_ids: list[int]
    gen_kwargs: dict[str, Any]
    budget: int | None


async def _prepare(state: ServerState, body: Mapping[str, Any]) -> _Prepared:
    field(body, "model", str, required=True)
    messages = _messages(state, body)
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), tools)
    thinking, budget = _thinking(body)
    if thinking and choice not in ("auto", "none"):
        raise invalid(
            "thinking cannot be enabled when tool_choice forces a tool call", "tool_choice"
        )
    template_kwargs = dict(field(body, "chat_template_kwargs", dict, {}))
    template_kwargs.pop("enable_thinking", None)
    preserve = template_kwargs.pop("preserve_thinking", None)
    ids, gen_kwargs = await asyncio.to_thread(
        prepare_chat,
        state,
        messages,
        tools,
        choice,
        enable_thinking=thinking,
        preserve_thinking=preserve,
        template_kwargs=template_kwargs,
    )
    return _Prepared(ids, gen_kwargs, budget)


def _check_fields(state: ServerState, body: Mapping[str, Any]) -> None:
    known = _KNOWN | (TEST_HOOK_FIELDS if state.enable_test_hooks else set())
    extra = sorted(set(body) - known)
    if extra:
        log.info("/v1/messages: ignoring fields %s", extra)


async def count_tokens(request: Request, state: ServerState) -> Response:
    body = await read_body(request)
    prepared = await _prepare(state, body)
    return JSONResponse({"input_tokens": len(prepared.prompt_ids)})


def _stop_reason(g: Generation) -> tuple[str, str | None]:
    if g.finish_reason == "length":
        return "max_tokens", None
    if isinstance(g.stop_reason, str):
        return "stop_sequence", g.stop_reason
    if g.result.tool_calls:
        return "tool_use", None
    return "end_turn", None


def _usage(g: Generation) -> dict[str, Any]:
    # As Anthropic counts: input_tokens are those not read from the cache.
    return {
        "input_tokens": g.prompt_tokens - g.cached_tokens,
        "output_tokens": g.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": g.cached_tokens,
    }


async def messages(request: Request, state: ServerState) -> Response:
    start = time.perf_counter()
    body = await read_body(request)
    _check_fields(state, body)
    model = field(body, "model", str, required=True)
    _log_model(state, model)
    max_tokens = field(body, "max_tokens", int, required=True)
    if max_tokens < 1:
        raise invalid("'max_tokens' must be >= 1", "max_tokens")
    temperature = field(body, "temperature", float)
    if temperature is not None and not 0 <= temperature <= 1:
        raise invalid(f"'temperature' must be in [0, 1], got {temperature}", "temperature")
    stop = field(body, "stop_sequences", list)
    stream = field(body, "stream", bool, False)
    prepared = await _prepare(state, body)
    values = {
        "temperature": temperature,
        "top_p": body.get("top_p"),
        "top_k": body.get("top_k"),
        "stop": stop,
        "max_tokens": max_tokens,
    }
    params = sampling_params(state, values, param_names={"stop": "stop_sequences"})
    fitted = fit_max_tokens(state, len(prepared.prompt_ids), max_tokens, "messages")
    params = dataclasses.replace(params, max_tokens=fitted)
    g = Generation(
        state,
        prepared.prompt_ids,
        params,
        start=start,
        thinking_budget=prepared.budget,
        forced=forced_tokens(state, body),
        **prepared.gen_kwargs,
    )
    submit_all([g])
    mid = new_id("msg_")
    tool_ids: dict[int, str] = {}

    def tool_id(index: int) -> str:
        return tool_ids.setdefault(index, new_id("toolu_"))

    if not stream:
        await collect_all(request, state, [g])
        if g.finish_reason == "abort":
            raise ApiError("server", "the generation was aborted (the server is shutting down)")
        content: list[dict[str, Any]] = []
        if g.result.reasoning:
            content.append({"type": "thinking", "thinking": g.result.reasoning, "signature": ""})
        if g.result.content:
            content.append({"type": "text", "text": g.result.content})
        for i, call in enumerate(g.result.tool_calls):
            content.append(
                {
                    "type": "tool_use",
                    "id": tool_id(i),
                    "name": call.name,
                    "input": json.loads(call.arguments),
                }
            )
        reason, sequence = _stop_reason(g)
        return JSONResponse(
            {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": reason,
                "stop_sequence": sequence,
                "usage": _usage(g),
            }
        )

    async def events() -> AsyncIterator[bytes]:
        message = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**_usage(g), "output_tokens": 0},
        }
        yield sse({"type": "message_start", "message": message}, "message_start")
        yield sse({"type": "ping"}, "ping")
        index, kind = -1, None  # the open block

        def stop_block() -> bytes:
            return sse({"type": "content_block_stop", "index": index}, "content_block_stop")

        def start_block(block: dict[str, Any]) -> bytes:
            return sse(
                {"type": "content_block_start", "index": index, "content_block": block},
                "content_block_start",
            )

        def delta(body: dict[str, Any]) -> bytes:
            return sse(
                {"type": "content_block_delta", "index": index, "delta": body},
                "content_block_delta",
            )

        async for chunk in keepalive(g.chunks(), PING_INTERVAL):
            if chunk is None:
                yield sse({"type": "ping"}, "ping")
                continue
            for e in chunk.events:
                want = (
                    "thinking"
                    if isinstance(e, sp.Reasoning)
                    else "text"
                    if isinstance(e, sp.Content)
                    else "tool"
                )
                if isinstance(e, sp.ToolCallEnd):
                    continue
                if want != kind or isinstance(e, sp.ToolCallStart):
                    if kind is not None:
                        yield stop_block()
                    index, kind = index + 1, want
                    if isinstance(e, sp.Reasoning):
                        yield start_block({"type": "thinking", "thinking": "", "signature": ""})
                    elif isinstance(e, sp.Content):
                        yield start_block({"type": "text", "text": ""})
                    else:
                        yield start_block(
                            {
                                "type": "tool_use",
                                "id": tool_id(e.index),
                                "name": e.name,
                                "input": {},
                            }
                        )
                if isinstance(e, sp.Reasoning):
                    yield delta({"type": "thinking_delta", "thinking": e.text})
                elif isinstance(e, sp.Content):
                    yield delta({"type": "text_delta", "text": e.text})
                elif isinstance(e, sp.ToolCallArgs):
                    yield delta({"type": "input_json_delta", "partial_json": e.text})
            if chunk.finish_reason is None:
                continue
            if kind is not None:
                yield stop_block()
            if g.finish_reason == "abort":
                err = ApiError("server", "the generation was aborted")
                yield sse(error_body(err), "error")
                return
            reason, sequence = _stop_reason(g)
            yield sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    # cumulative, as the API sends it: the cache read is known only now
                    "usage": _usage(g),
                },
                "message_delta",
            )
            yield sse({"type": "message_stop"}, "message_stop")

    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for piece in events():
                yield piece
        except Exception as e:
            log.exception("stream failed")
            yield sse(error_body(ApiError("server", f"generation failed: {e}")), "error")
        finally:
            if g.finish_reason is None:
                state.metrics.disconnected.inc()
                g.cancel()

    return StreamingResponse(guarded(), media_type="text/event-stream", headers=SSE_HEADERS)
