"""The OpenAI routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/v1/responses`.

Each handler validates its body into prompt ids and `SamplingParams` (every refusal is an
`ApiError` naming the field), submits one `Generation` per output (`n`), and either collects them
(non-streaming) or turns their chunks into SSE events. The formats follow the OpenAI API and vLLM's
extensions (`reasoning_content`, `top_k`, `min_p`, `repetition_penalty`, `chat_template_kwargs`).

Choices this server makes where the API leaves room (see also SERVING.md):

* `developer` messages are sent as `system` (the Qwen template rejects the role); leading
  system/developer messages are merged into one, as the template allows only one, first.
* `tool_choice` "required" or a named function: the reply is started with the call's opening
  tags (`<tool_call>\\n<function=NAME>\\n`, reasoning closed), so the model must write a call;
  "none" renders the tools but does not parse calls.
* `response_format` (Responses: `text.format`) json_object / json_schema: the content is decoded
  under the schema's grammar (`qwenjax.serve.grammar`; with thinking on, from `</think>` on), and
  is not parsed for tool calls; a schema llguidance cannot compile is a 400 naming
  `response_format.json_schema` with its message. Combined with a forced tool call it is a 400.
* Fields the API defines but this server does not implement (`store`, `metadata`, `user`, ...)
  are accepted and logged; fields it does not define are a 400.
* `max_tokens` larger than the room the context leaves is cut to it (finish reason "length").
* `reasoning_effort` "none"/"minimal" turns thinking off (unless chat_template_kwargs says).
* Images: `image_url` parts (Responses: `input_image`) in user messages, as base64 data: URLs
  (`media`: nothing is fetched), when the model has a vision tower; the prompt's images go to the
  scheduler with its ids. Video, audio and file parts are a 400.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from qwenjax.inference.text import opens_thinking
from qwenjax.serve import media
from qwenjax.serve import stream_parser as sp
from qwenjax.serve.common import (
    SSE_HEADERS,
    TEST_HOOK_FIELDS,
    THINK_END,
    ApiError,
    Chunk,
    Generation,
    ServerState,
    check_unknown,
    field,
    fit_max_tokens,
    forced_tokens,
    invalid,
    log,
    merge,
    new_id,
    render_chat,
    sampling_params,
    sse,
    submit_all,
    wait_or_disconnect,
)
from qwenjax.serve.grammar import Grammar
from qwenjax.vision.processor import extract_media

# Sampling fields shared by every OpenAI route (OpenAI's plus vLLM's extras).
_SAMPLING = {
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "stop",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "stop_token_ids",
}
_CHAT_FIELDS = _SAMPLING | {
    "messages",
    "model",
    "stream",
    "stream_options",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
    "chat_template_kwargs",
    "reasoning_effort",
}
_CHAT_IGNORED = {
    "store",
    "metadata",
    "user",
    "service_tier",
    "parallel_tool_calls",
    "prediction",
    "audio",
    "modalities",
    "verbosity",
    "web_search_options",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "safety_identifier",
    "moderation",
    "functions",
    "function_call",
}
_COMPLETION_FIELDS = _SAMPLING | {
    "model",
    "prompt",
    "suffix",
    "max_tokens",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "echo",
    "best_of",
}
_COMPLETION_IGNORED = {"user"}
_RESPONSES_FIELDS = _SAMPLING | {
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "tools",
    "tool_choice",
    "stream",
    "previous_response_id",
    "reasoning",
    "text",
    "top_logprobs",
    "background",
    "conversation",
    "chat_template_kwargs",
    "stream_options",
}
_RESPONSES_IGNORED = {
    "store",
    "metadata",
    "user",
    "parallel_tool_calls",
    "truncation",
    "include",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "max_tool_calls",
    "prompt",
}
_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_N = 16


# ---------------------------------------------------------------------------- errors
_ERROR_STATUS = {
    "invalid_request": 400,
    "authentication": 401,
    "not_found": 404,
    "overloaded": 429,
    "server": 500,
}
_ERROR_TYPE = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "not_found": "not_found_error",
    "overloaded": "rate_limit_error",
    "server": "server_error",
}


def error_body(e: ApiError) -> dict[str, Any]:
    code = e.code or {"authentication": "invalid_api_key", "overloaded": "server_busy"}.get(e.kind)
    return {
        "error": {"message": e.message, "type": _ERROR_TYPE[e.kind], "param": e.param, "code": code}
    }


def error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.kind == "overloaded" else None
    return JSONResponse(error_body(e), status_code=_ERROR_STATUS[e.kind], headers=headers)


def _check_model(state: ServerState, body: Mapping[str, Any]) -> None:
    model = field(body, "model", str, required=True)
    if model != state.model_name:
        raise ApiError(
            "not_found",
            f"the model '{model}' does not exist; this server serves '{state.model_name}'",
            param="model",
            code="model_not_found",
        )


# ---------------------------------------------------------------------------- /v1/models
def models(state: ServerState) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": state.model_name,
                "object": "model",
                "created": state.created,
                "owned_by": "qwenjax",
                "max_model_len": state.max_length,
            }
        ],
    }


# ---------------------------------------------------------------------------- chat input
_IMAGE_PARTS = ("image_url", "input_image")  # Chat Completions, Responses
_NO_VIDEO = "video input is not supported: this server decodes no video files"
_UNSUPPORTED_PARTS = {
    "video_url": _NO_VIDEO,
    "video": _NO_VIDEO,
    "input_audio": "audio input is not supported",
    "file": "file inputs are not supported",
    "input_file": "file inputs are not supported",
}


def _image(state: ServerState, part: dict[str, Any], where: str, user: bool) -> dict[str, Any]:
    """An `image_url` (`{"url": ...}`) or `input_image` (`image_url` a string) part."""
    media.require_images(state, where)
    if not user:
        raise invalid(f"'{where}': images are accepted in user messages only", where)
    url = part.get("image_url")
    if url is None and part.get("file_id") is not None:  # Responses: an uploaded file
        raise invalid(f"'{where}.file_id': files are not stored here; send image_url", where)
    url = url.get("url") if isinstance(url, dict) else url  # `detail` is ignored
    return media.image_part(state, url, f"{where}.image_url")


def _text_parts(
    content: Any,
    where: str,
    allowed: tuple[str, ...] = ("text",),
    *,
    state: ServerState | None = None,
    user: bool = False,
) -> str | list:
    """Message content: a string, or a list of text parts; image parts (given `state`) become
    the template's decoded image parts (`media`); other part types are a 400."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"'{where}' must be a string or a list of content parts", where)
    out = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        pw = f"{where}[{i}]"
        if kind in _IMAGE_PARTS and state is not None:
            out.append(_image(state, part, pw, user))
        elif kind not in allowed or not isinstance(part.get("text"), str):
            if kind in _UNSUPPORTED_PARTS or kind in _IMAGE_PARTS:
                reason = _UNSUPPORTED_PARTS.get(kind, "images are not accepted here")
                raise invalid(f"'{pw}': {reason}", pw)
            raise invalid(f"'{pw}' must be a text part {{'type': {allowed[0]!r}, 'text': ...}}", pw)
        else:
            out.append({"type": "text", "text": part["text"]})
    return out


def _arguments(value: Any, where: str) -> dict[str, Any]:
    """Tool-call arguments for the template: a mapping (the SDKs send a JSON string)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise invalid(f"'{where}' is not valid JSON: {e}", where) from None
    if not isinstance(value, dict):
        raise invalid(f"'{where}' must be a JSON object", where)
    return value


def chat_messages(state: ServerState, raw: Any, param: str = "messages") -> list[dict[str, Any]]:
    """OpenAI chat messages → messages for the chat template (validated, developer → system,
    leading system messages merged, tool-call arguments parsed, images decoded)."""
    if not isinstance(raw, list) or not raw:
        raise invalid(f"'{param}' must be a non-empty array of messages", param)
    out: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"'{where}' must be an object", where)
        role = m.get("role")
        if role not in _ROLES:
            raise invalid(
                f"'{where}.role' must be one of {', '.join(_ROLES)}, got {json.dumps(role)}",
                f"{where}.role",
            )
        message: dict[str, Any] = {"role": "system" if role == "developer" else role}
        content = m.get("content")
        if content is None and role != "assistant":
            raise invalid(f"'{where}.content' is required for a {role} message", f"{where}.content")
        if content is not None:
            message["content"] = _text_parts(
                content, f"{where}.content", state=state, user=role == "user"
            )
        if role == "assistant":
            for name in ("reasoning_content", "reasoning"):
                if isinstance(m.get(name), str) and "reasoning_content" not in message:
                    message["reasoning_content"] = m[name]
            calls = m.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list):
                    raise invalid(f"'{where}.tool_calls' must be an array", f"{where}.tool_calls")
                message["tool_calls"] = []
                for j, call in enumerate(calls):
                    fn = call.get("function") if isinstance(call, dict) else None
                    cw = f"{where}.tool_calls[{j}].function"
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                        raise invalid(f"'{cw}' must be an object with a 'name'", cw)
                    args = _arguments(fn.get("arguments", {}), cw + ".arguments")
                    message["tool_calls"].append(
                        {
                            "id": call.get("id"),
                            "type": "function",
                            "function": {"name": fn["name"], "arguments": args},
                        }
                    )
        if role == "tool" and m.get("tool_call_id") is not None:
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return merge_leading_system(out)


def merge_leading_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The template takes one system message, first: merge the leading ones (a client's system
    prompt plus an agent's developer instructions)."""
    n = 0
    while n < len(messages) and messages[n]["role"] == "system":
        n += 1
    if n < 2:
        return messages
    texts = []
    for m in messages[:n]:
        content = m.get("content", "")
        texts.append(content if isinstance(content, str) else "".join(p["text"] for p in content))
    return [{"role": "system", "content": "\n\n".join(texts)}, *messages[n:]]


def chat_tools(
    raw: Any, param: str = "tools", *, flat: bool = False
) -> list[dict[str, Any]] | None:
    """Tool schemas in the chat format (`flat`: the Responses API's `{type, name, parameters}`)."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise invalid(f"'{param}' must be an array of tools", param)
    out = []
    for i, tool in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise invalid(f"'{where}': only function tools are supported, got type {kind!r}", where)
        fn = tool if flat else tool.get("function")
        fw = where if flat else f"{where}.function"
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise invalid(f"'{fw}.name' is required", f"{fw}.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise invalid(
                f"'{fw}.parameters' must be a JSON schema of type 'object'", f"{fw}.parameters"
            )
        entry = {"name": fn["name"], "parameters": params}
        if isinstance(fn.get("description"), str):
            entry["description"] = fn["description"]
        out.append({"type": "function", "function": entry})
    return out or None


def tool_choice(raw: Any, tools: list[dict[str, Any]] | None, param: str = "tool_choice") -> Any:
    """ "auto" / "none" / "required" / a function name (None: auto)."""
    if raw is None or raw == "auto":
        return "auto"
    if raw in ("none", "required"):
        if raw == "required" and not tools:
            raise invalid("tool_choice 'required' needs tools", param)
        return raw
    name = None
    if isinstance(raw, dict) and raw.get("type") == "function":
        fn = raw.get("function", raw)
        name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise invalid(
            "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', ...}", param
        )
    if name not in [t["function"]["name"] for t in tools or ()]:
        raise invalid(f"tool_choice names the function '{name}', which is not in tools", param)
    return {"name": name}


def prepare_chat(
    state: ServerState,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    choice: Any,
    *,
    enable_thinking: bool | None,
    preserve_thinking: bool | None,
    template_kwargs: Mapping[str, Any] | None = None,
    param: str = "messages",
    grammar: Grammar | None = None,
) -> tuple[list[int], dict[str, Any]]:
    """Prompt ids and the `Generation` keyword arguments of a chat request (its images, decoded
    by `media`, are preprocessed here and their pads expanded: call it off the event loop)."""
    forced_call = choice == "required" or isinstance(choice, dict)
    if grammar is not None and forced_call:
        raise invalid(
            "a JSON response_format cannot be combined with a required tool call (tool_choice)",
            "response_format",
        )
    messages, images = extract_media(messages)
    text = render_chat(
        state,
        messages,
        tools,
        enable_thinking=enable_thinking,
        preserve_thinking=preserve_thinking,
        template_kwargs=template_kwargs,
        param=param,
    )
    vision = None
    if state.max_images is not None and len(images) > state.max_images:
        raise invalid(
            f"'{param}' holds {len(images)} images; this server takes at most "
            f"{state.max_images} per request",
            param,
        )
    if images:
        try:
            vision, timestamps = state.processor.load(images)
            text = state.processor.expand(text, vision, timestamps)
        except ValueError as e:  # e.g. image placeholders typed into the text
            raise invalid(f"cannot prepare the images: {e}", param) from None
    prefill = ""
    if forced_call:
        # No grammar: start the reply with the call's tags, so the model has to write one.
        if text.rstrip().endswith("<think>"):
            text = text.rstrip() + THINK_END
        prefill = "<tool_call>\n<function=" + (
            choice["name"] + ">\n" if choice != "required" else ""
        )
        text += prefill
    ids = state.tokenizer.encode(text)
    if not ids:
        raise invalid("the prompt is empty", param)
    gen_kwargs = {
        "thinking_open": opens_thinking(state.tokenizer, ids),
        "tools": tools,
        "parse_tool_calls": bool(tools) and choice != "none" and grammar is None,
        "prefill_text": prefill,
        "grammar": grammar,
        "vision": vision,
    }
    return ids, gen_kwargs


def _template_flags(body: Mapping[str, Any]) -> tuple[bool | None, bool | None, dict[str, Any]]:
    kwargs = field(body, "chat_template_kwargs", dict, {})
    kwargs = dict(kwargs)
    enable = kwargs.pop("enable_thinking", None)
    preserve = kwargs.pop("preserve_thinking", None)
    for name, value in (("enable_thinking", enable), ("preserve_thinking", preserve)):
        if value is not None and not isinstance(value, bool):
            raise invalid(
                f"'chat_template_kwargs.{name}' must be a boolean", "chat_template_kwargs"
            )
    effort = body.get("reasoning_effort")
    if effort is None and isinstance(body.get("reasoning"), dict):
        effort = body["reasoning"].get("effort")
    if enable is None and effort in ("none", "minimal"):
        enable = False
    return enable, preserve, kwargs


async def _grammar(state: ServerState, value: Any, param: str, *, flat: bool) -> Grammar | None:
    """The grammar a `response_format` asks for (None: text). Chat Completions nests the schema
    as `json_schema.schema`; the Responses API's `text.format` (`flat`) holds `schema` itself."""
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        schema, where = {"type": "object"}, param
    elif kind == "json_schema":
        where = param if flat else f"{param}.json_schema"
        holder = (
            value if flat else field(value, "json_schema", dict, required=True, prefix=param + ".")
        )
        schema = field(holder, "schema", dict, required=True, prefix=where + ".")
    else:
        raise invalid(f"'{param}.type' must be 'text', 'json_object' or 'json_schema'", param)
    try:  # compiling a large schema takes a while: off the event loop
        return await asyncio.to_thread(state.grammars.json, schema)
    except ValueError as e:
        raise invalid(f"'{where}' cannot be used for constrained decoding: {e}", where) from None


# ---------------------------------------------------------------------------- output pieces
def _token_text(state: ServerState, token_id: int) -> str:
    return state.tokenizer.decode([token_id])


def _chat_logprobs(state: ServerState, chunk: Chunk, top: int) -> list[dict[str, Any]]:
    out = []
    for lp in chunk.logprobs:
        token = _token_text(state, lp.token_id)
        out.append(
            {
                "token": token,
                "logprob": lp.logprob,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": (t := _token_text(state, i)), "logprob": v, "bytes": list(t.encode())}
                    for i, v in lp.top[:top]
                ],
            }
        )
    return out


def _usage(gens: Sequence[Generation], *, chat: bool = True) -> dict[str, Any]:
    prompt = sum(g.prompt_tokens for g in gens[:1]) if gens else 0
    completion = sum(g.completion_tokens for g in gens)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        # the first choice's, like prompt_tokens (the n choices share one prompt)
        "prompt_tokens_details": {"cached_tokens": sum(g.cached_tokens for g in gens[:1])},
    }
    if chat:
        usage["completion_tokens_details"] = {
            "reasoning_tokens": sum(g.reasoning_tokens for g in gens)
        }
    return usage


def _finish_reason(g: Generation) -> str:
    if g.finish_reason == "stop" and g.result.tool_calls:
        return "tool_calls"
    return g.finish_reason or "stop"


def _tool_call_id() -> str:
    return new_id("call_")


# ---------------------------------------------------------------------------- helpers
async def read_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


async def collect_all(request: Request, state: ServerState, gens: Sequence[Generation]) -> None:
    """Run the generations to the end; a client that disconnects first cancels them."""

    def cancel() -> None:
        state.metrics.disconnected.inc()
        for g in gens:
            g.cancel()

    await wait_or_disconnect(request.receive, asyncio.gather(*(g.collect() for g in gens)), cancel)


def _streaming(body: AsyncIterator[bytes], state: ServerState, gens: Sequence[Generation]):
    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for piece in body:
                yield piece
        except asyncio.CancelledError:
            state.metrics.disconnected.inc()
            raise
        except Exception as e:  # after the headers: report in the stream, then end it
            log.exception("stream failed")
            yield sse(error_body(ApiError("server", f"generation failed: {e}")))
            yield sse("[DONE]")
        finally:
            for g in gens:
                if g.finish_reason is None:
                    g.cancel()

    return StreamingResponse(guarded(), media_type="text/event-stream", headers=SSE_HEADERS)


def _generations(
    state: ServerState,
    prompt_ids: list[int],
    params: Any,
    n: int,
    start: float,
    forced: list[int] | None,
    **kwargs: Any,
) -> list[Generation]:
    gens = []
    for i in range(n):
        p = params
        if i and params.seed is not None:  # n samples, not n copies of one
            p = dataclasses.replace(params, seed=params.seed + i)
        gens.append(Generation(state, prompt_ids, p, start=start, forced=forced, **kwargs))
    submit_all(gens)
    return gens


# ---------------------------------------------------------------------------- chat completions
async def chat_completions(request: Request, state: ServerState) -> Response:
    start = time.perf_counter()
    body = await read_body(request)
    known = _CHAT_FIELDS | (TEST_HOOK_FIELDS if state.enable_test_hooks else set())
    check_unknown(body, known, _CHAT_IGNORED, "/v1/chat/completions")
    _check_model(state, body)
    messages = chat_messages(state, body.get("messages"))
    tools = chat_tools(body.get("tools"))
    choice = tool_choice(body.get("tool_choice"), tools)
    grammar = await _grammar(state, body.get("response_format"), "response_format", flat=False)
    stream = field(body, "stream", bool, False)
    stream_options = field(body, "stream_options", dict, {})
    include_usage = field(stream_options, "include_usage", bool, False, prefix="stream_options.")
    n = field(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise invalid(f"'n' must be in [1, {MAX_N}], got {n}", "n")
    enable, preserve, template_kwargs = _template_flags(body)
    prompt_ids, gen_kwargs = await asyncio.to_thread(
        prepare_chat,
        state,
        messages,
        tools,
        choice,
        enable_thinking=enable,
        preserve_thinking=preserve,
        template_kwargs=template_kwargs,
        grammar=grammar,
    )
    requested = body.get("max_completion_tokens")
    requested = body.get("max_tokens") if requested is None else requested
    names = {
        "max_tokens": "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    }
    values = {k: body.get(k) for k in _SAMPLING}
    values |= {
        "logprobs": body.get("logprobs"),
        "top_logprobs": body.get("top_logprobs"),
        "max_tokens": requested,
    }
    params = sampling_params(state, values, param_names=names)
    params = dataclasses.replace(
        params, max_tokens=fit_max_tokens(state, len(prompt_ids), params.max_tokens, "messages")
    )
    forced = forced_tokens(state, body)
    gens = _generations(state, prompt_ids, params, n, start, forced, **gen_kwargs)
    rid, created = new_id("chatcmpl-"), int(time.time())
    top = params.top_logprobs or 0
    if not stream:
        await collect_all(request, state, gens)
        choices = []
        for i, g in enumerate(gens):
            message: dict[str, Any] = {"role": "assistant"}
            calls = [
                {
                    "id": _tool_call_id(),
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in g.result.tool_calls
            ]
            message["content"] = g.result.content if (g.result.content or not calls) else None
            message["reasoning_content"] = g.result.reasoning or None
            if calls:
                message["tool_calls"] = calls
            logprobs = None
            if params.logprobs:
                content = []
                for chunk in g.chunks_seen:
                    content += _chat_logprobs(state, chunk, top)
                logprobs = {"content": content, "refusal": None}
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": _finish_reason(g),
                    "stop_reason": g.stop_reason,
                }
            )
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": state.model_name,
                "choices": choices,
                "usage": _usage(gens),
            }
        )

    def frame(i: int, delta: dict[str, Any], finish: str | None = None, logprobs=None) -> bytes:
        choice_out = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        out = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": state.model_name,
            "choices": [choice_out],
        }
        if include_usage:
            out["usage"] = None
        return sse(out)

    async def events() -> AsyncIterator[bytes]:
        call_ids: list[dict[int, str]] = [{} for _ in gens]
        for i in range(n):
            yield frame(i, {"role": "assistant", "content": ""})
        async for i, chunk in merge([g.chunks() for g in gens]):
            g = gens[i]
            logprobs = None
            if params.logprobs and chunk.logprobs:
                logprobs = {"content": _chat_logprobs(state, chunk, top), "refusal": None}
            for event in chunk.events:
                if isinstance(event, sp.ToolCallEnd):  # no wire form in chat completions
                    continue
                delta = _chat_delta(event, call_ids[i])
                yield frame(i, delta, logprobs=logprobs)
                logprobs = None
            if logprobs is not None:
                yield frame(i, {"content": ""}, logprobs=logprobs)
            if chunk.finish_reason is not None:
                yield frame(i, {}, _finish_reason(g))
        if include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": state.model_name,
                    "choices": [],
                    "usage": _usage(gens),
                }
            )
        yield sse("[DONE]")

    return _streaming(events(), state, gens)


def _chat_delta(event: sp.Event, call_ids: dict[int, str]) -> dict[str, Any]:
    if isinstance(event, sp.Reasoning):
        return {"reasoning_content": event.text}
    if isinstance(event, sp.Content):
        return {"content": event.text}
    if isinstance(event, sp.ToolCallStart):
        call_ids[event.index] = _tool_call_id()
        return {
            "tool_calls": [
                {
                    "index": event.index,
                    "id": call_ids[event.index],
                    "type": "function",
                    "function": {"name": event.name, "arguments": ""},
                }
            ]
        }
    assert isinstance(event, sp.ToolCallArgs)
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


# ---------------------------------------------------------------------------- completions
def _prompts(state: ServerState, raw: Any) -> list[list[int]]:
    """`prompt`: a string, strings, token ids, or lists of token ids."""

    def one(p: Any, where: str) -> list[int]:
        if isinstance(p, str):
            ids = state.tokenizer.encode(p)
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < state.vocab_size]
            if bad:
                raise invalid(f"'{where}' has token ids outside [0, {state.vocab_size})", "prompt")
        else:
            raise invalid(f"'{where}' must be a string or a list of token ids", "prompt")
        if not ids:
            raise invalid(f"'{where}' is empty", "prompt")
        return ids

    if raw is None:
        raise invalid("'prompt' is required", "prompt")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        return [one(raw, "prompt")]
    if not isinstance(raw, list) or not raw:
        raise invalid("'prompt' must be a string, a list of strings or of token-id lists", "prompt")
    return [one(p, f"prompt[{i}]") for i, p in enumerate(raw)]


def _completion_logprobs(
    state: ServerState, chunks: Sequence[Chunk], top: int, offset: int
) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for chunk in chunks:
        for lp in chunk.logprobs:
            token = _token_text(state, lp.token_id)
            out["tokens"].append(token)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({_token_text(state, i): v for i, v in lp.top[:top]})
            out["text_offset"].append(offset)
            offset += len(token)
    return out, offset


async def completions(request: Request, state: ServerState) -> Response:
    start = time.perf_counter()
    body = await read_body(request)
    known = _COMPLETION_FIELDS | (TEST_HOOK_FIELDS if state.enable_test_hooks else set())
    check_unknown(body, known, _COMPLETION_IGNORED, "/v1/completions")
    _check_model(state, body)
    prompts = _prompts(state, body.get("prompt"))
    if body.get("suffix") not in (None, ""):
        raise invalid("'suffix' is not supported by this model", "suffix")
    n = field(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise invalid(f"'n' must be in [1, {MAX_N}], got {n}", "n")
    best_of = field(body, "best_of", int)
    if best_of is not None and best_of != n:
        raise invalid("'best_of' other than n is not supported", "best_of")
    echo = field(body, "echo", bool, False)
    num_logprobs = field(body, "logprobs", int)
    if num_logprobs is not None and not 0 <= num_logprobs <= 5:
        raise invalid(f"'logprobs' must be in [0, 5], got {num_logprobs}", "logprobs")
    if echo and num_logprobs is not None:
        raise invalid("'echo' with 'logprobs' (prompt logprobs) is not supported", "echo")
    stream = field(body, "stream", bool, False)
    stream_options = field(body, "stream_options", dict, {})
    include_usage = field(stream_options, "include_usage", bool, False, prefix="stream_options.")
    values = {k: body.get(k) for k in _SAMPLING}
    values |= {
        "max_tokens": field(body, "max_tokens", int, 16),
        "logprobs": num_logprobs is not None,
        "top_logprobs": num_logprobs,
    }
    params = sampling_params(state, values)
    forced = forced_tokens(state, body)
    gens: list[Generation] = []
    try:
        for ids in prompts:
            fitted = dataclasses.replace(
                params, max_tokens=fit_max_tokens(state, len(ids), params.max_tokens, "prompt")
            )
            gens += _generations(state, ids, fitted, n, start, forced)
    except ApiError:
        for g in gens:
            g.cancel()
        raise
    rid, created = new_id("cmpl-"), int(time.time())
    echoes = [state.tokenizer.decode(ids) if echo else "" for ids in prompts for _ in range(n)]

    def usage() -> dict[str, Any]:
        prompt = sum(len(ids) for ids in prompts)
        completion = sum(g.completion_tokens for g in gens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            # one choice per prompt counted, like prompt_tokens
            "prompt_tokens_details": {"cached_tokens": sum(g.cached_tokens for g in gens[::n])},
        }

    if not stream:
        await collect_all(request, state, gens)
        choices = []
        for i, g in enumerate(gens):
            logprobs = None
            if num_logprobs is not None:
                logprobs, _ = _completion_logprobs(state, g.chunks_seen, num_logprobs, 0)
            choices.append(
                {
                    "index": i,
                    "text": echoes[i] + g.text,
                    "logprobs": logprobs,
                    "finish_reason": g.finish_reason,
                    "stop_reason": g.stop_reason,
                }
            )
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": state.model_name,
                "choices": choices,
                "usage": usage(),
            }
        )

    def frame(i: int, text: str, finish: str | None, logprobs: Any) -> bytes:
        out = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": state.model_name,
            "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }
        if include_usage:
            out["usage"] = None
        return sse(out)

    async def events() -> AsyncIterator[bytes]:
        offsets = [len(e) for e in echoes]
        for i, text in enumerate(echoes):
            if text:
                yield frame(i, text, None, None)
        async for i, chunk in merge([g.chunks() for g in gens]):
            logprobs = None
            if num_logprobs is not None:
                logprobs, offsets[i] = _completion_logprobs(
                    state, [chunk], num_logprobs, offsets[i]
                )
            if chunk.text or chunk.finish_reason is not None or chunk.logprobs:
                yield frame(i, chunk.text, chunk.finish_reason, logprobs)
        if include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": state.model_name,
                    "choices": [],
                    "usage": usage(),
                }
            )
        yield sse("[DONE]")

    return _streaming(events(), state, gens)


# ---------------------------------------------------------------------------- responses
def _responses_messages(state: ServerState, body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`instructions` + `input` (a string or input items) → chat messages."""
    messages: list[dict[str, Any]] = []
    instructions = field(body, "instructions", str)
    if instructions:
        messages.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if isinstance(raw, str):
        return [*messages, {"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise invalid("'input' must be a string or a non-empty array of items", "input")
    reasoning: str | None = None
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"'{where}' must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                raise invalid(
                    f"'{where}.role' must be system, developer, user or assistant, "
                    f"got {json.dumps(role)}",
                    f"{where}.role",
                )
            content = _text_parts(
                item.get("content"),
                f"{where}.content",
                ("input_text", "output_text", "text"),
                state=state,
                user=role == "user",
            )
            message = {"role": "system" if role == "developer" else role, "content": content}
            if role == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            messages.append(message)
        elif kind == "function_call":
            for name in ("name", "call_id"):
                field(item, name, str, required=True, prefix=where + ".")
            args = _arguments(item.get("arguments", "{}"), f"{where}.arguments")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": args},
            }
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or last.get("_closed"):
                last = {"role": "assistant", "content": ""}
                if reasoning is not None:
                    last["reasoning_content"], reasoning = reasoning, None
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = _text_parts(
                    output, f"{where}.output", ("input_text", "output_text", "text")
                )
                output = "".join(p["text"] for p in output)
            messages.append(
                {"role": "tool", "content": output, "tool_call_id": item.get("call_id")}
            )
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        else:
            raise invalid(f"'{where}.type' {kind!r} is not supported", f"{where}.type")
    return merge_leading_system(messages)


def _response_object(
    state: ServerState,
    rid: str,
    created: int,
    body: Mapping[str, Any],
    output: list[dict[str, Any]],
    status: str,
    usage: dict[str, Any] | None,
    incomplete: str | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": state.model_name,
        "output": output,
        "usage": usage,
        "error": None,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "parallel_tool_calls": True,
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "text": body.get("text") or {"format": {"type": "text"}},
        "reasoning": body.get("reasoning"),
        "metadata": body.get("metadata") or {},
        "previous_response_id": None,
        "store": False,
    }


def _response_usage(g: Generation) -> dict[str, Any]:
    return {
        "input_tokens": g.prompt_tokens,
        "input_tokens_details": {"cached_tokens": g.cached_tokens},
        "output_tokens": g.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": g.reasoning_tokens},
        "total_tokens": g.prompt_tokens + g.completion_tokens,
    }


class _ResponseBuilder:
    """Parser events → Responses output items, and the streaming events that build them."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.kind: str | None = None  # the open item's kind
        self.seq = 0

    def event(self, kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return kind, event

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self.kind is None:
            return []
        item, index, out = self.items[-1], len(self.items) - 1, []
        if self.kind == "reasoning":
            part = item["content"][0]
            out.append(
                self.event(
                    "response.reasoning_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=part["text"],
                )
            )
            out.append(
                self.event(
                    "response.content_part.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        elif self.kind == "message":
            part = item["content"][0]
            out.append(
                self.event(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=part["text"],
                    logprobs=[],
                )
            )
            out.append(
                self.event(
                    "response.content_part.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        else:
            out.append(
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        item["status"] = "completed"
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.kind = None
        return out

    def _open(self, kind: str, item: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        out = self._close()
        self.items.append(item)
        self.kind = kind
        index = len(self.items) - 1
        shown = copy.deepcopy(item)
        if kind != "function_call":
            shown["content"] = []
        out.append(self.event("response.output_item.added", output_index=index, item=shown))
        if kind != "function_call":
            out.append(
                self.event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=item["content"][0],
                )
            )
        return out

    def feed(self, events: Sequence[sp.Event]) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for e in events:
            index = len(self.items) - 1
            if isinstance(e, sp.Reasoning):
                if self.kind != "reasoning":
                    out += self._open(
                        "reasoning",
                        {
                            "type": "reasoning",
                            "id": new_id("rs_"),
                            "summary": [],
                            "content": [{"type": "reasoning_text", "text": ""}],
                            "status": "in_progress",
                        },
                    )
                    index += 1
                self.items[-1]["content"][0]["text"] += e.text
                out.append(
                    self.event(
                        "response.reasoning_text.delta",
                        item_id=self.items[-1]["id"],
                        output_index=index,
                        content_index=0,
                        delta=e.text,
                    )
                )
            elif isinstance(e, sp.Content):
                if self.kind != "message":
                    out += self._open(
                        "message",
                        {
                            "type": "message",
                            "id": new_id("msg_"),
                            "role": "assistant",
                            "status": "in_progress",
                            "content": [
                                {
                                    "type": "output_text",
                                    "text": "",
                                    "annotations": [],
                                    "logprobs": [],
                                }
                            ],
                        },
                    )
                    index += 1
                self.items[-1]["content"][0]["text"] += e.text
                out.append(
                    self.event(
                        "response.output_text.delta",
                        item_id=self.items[-1]["id"],
                        output_index=index,
                        content_index=0,
                        delta=e.text,
                        logprobs=[],
                    )
                )
            elif isinstance(e, sp.ToolCallStart):
                out += self._open(
                    "function_call",
                    {
                        "type": "function_call",
                        "id": new_id("fc_"),
                        "call_id": _tool_call_id(),
                        "name": e.name,
                        "arguments": "",
                        "status": "in_progress",
                    },
                )
            elif isinstance(e, sp.ToolCallArgs):
                self.items[-1]["arguments"] += e.text
                out.append(
                    self.event(
                        "response.function_call_arguments.delta",
                        item_id=self.items[-1]["id"],
                        output_index=index,
                        delta=e.text,
                    )
                )
            elif isinstance(e, sp.ToolCallEnd):
                out += self._close()
        return out

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        return self._close()


async def responses(request: Request, state: ServerState) -> Response:
    start = time.perf_counter()
    body = await read_body(request)
    known = _RESPONSES_FIELDS | (TEST_HOOK_FIELDS if state.enable_test_hooks else set())
    check_unknown(body, known, _RESPONSES_IGNORED, "/v1/responses")
    _check_model(state, body)
    for name in ("previous_response_id", "conversation"):
        if body.get(name) is not None:
            raise invalid(
                f"'{name}' is not supported: this server stores no responses; send the whole "
                "conversation in 'input'",
                name,
            )
    if body.get("background"):
        raise invalid("'background' responses are not supported", "background")
    text_options = field(body, "text", dict, {})
    grammar = await _grammar(state, text_options.get("format"), "text.format", flat=True)
    messages = _responses_messages(state, body)
    tools = chat_tools(body.get("tools"), flat=True)
    choice = tool_choice(body.get("tool_choice"), tools)
    stream = field(body, "stream", bool, False)
    enable, preserve, template_kwargs = _template_flags(body)
    prompt_ids, gen_kwargs = await asyncio.to_thread(
        prepare_chat,
        state,
        messages,
        tools,
        choice,
        enable_thinking=enable,
        preserve_thinking=preserve,
        template_kwargs=template_kwargs,
        param="input",
        grammar=grammar,
    )
    values = {k: body.get(k) for k in _SAMPLING}
    values["max_tokens"] = body.get("max_output_tokens")
    params = sampling_params(state, values, param_names={"max_tokens": "max_output_tokens"})
    params = dataclasses.replace(
        params, max_tokens=fit_max_tokens(state, len(prompt_ids), params.max_tokens, "input")
    )
    forced = forced_tokens(state, body)
    (g,) = _generations(state, prompt_ids, params, 1, start, forced, **gen_kwargs)
    rid, created = new_id("resp_"), int(time.time())

    def final(builder: _ResponseBuilder) -> dict[str, Any]:
        incomplete = "max_output_tokens" if g.finish_reason == "length" else None
        status = "incomplete" if incomplete else "completed"
        return _response_object(
            state, rid, created, body, builder.items, status, _response_usage(g), incomplete
        )

    if not stream:
        await collect_all(request, state, [g])
        builder = _ResponseBuilder()
        for chunk in g.chunks_seen:
            builder.feed(chunk.events)
        builder.finish()
        return JSONResponse(final(builder))

    async def events() -> AsyncIterator[bytes]:
        builder = _ResponseBuilder()
        head = _response_object(state, rid, created, body, [], "in_progress", None)
        for kind in ("response.created", "response.in_progress"):
            name, event = builder.event(kind, response=head)
            yield sse(event, name)
        async for chunk in g.chunks():
            for name, event in builder.feed(chunk.events):
                yield sse(event, name)
            if chunk.finish_reason is not None:
                for name, event in builder.finish():
                    yield sse(event, name)
                result = final(builder)
                if g.finish_reason == "abort":
                    result["status"] = "failed"
                    result["error"] = {"code": "server_error", "message": "generation aborted"}
                    kind = "response.failed"
                else:
                    kind = (
                        "response.incomplete"
                        if result["status"] == "incomplete"
                        else ("response.completed")
                    )
                name, event = builder.event(kind, response=result)
                yield sse(event, name)

    return _streaming(events(), state, [g])
