"""The built-in Qwen3.6 chat renderer (ARCHITECTURE.md §7), in plain Python.

It produces, string for string, what `QWEN3_6_CHAT_TEMPLATE` renders through a transformers-style
Jinja environment (the tests check this), but it builds the text message by message, so it can also
say which characters belong to the assistant turns an SFT loss should train on.

Format summary:

* turns are `<|im_start|>{role}\\n{content}<|im_end|>\\n`; only the first message may be `system`;
* with tools, the system turn starts with a `# Tools` block (one JSON line per tool between
  `<tools>` tags and a fixed instruction for the XML tool-call format), then the system prompt;
* assistant tool calls are `<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n
  </parameter>\\n</function>\\n</tool_call>`; strings are written raw, everything else as JSON;
* consecutive `tool` messages are merged into one user turn of `<tool_response>` blocks;
* assistant turns after the last real user query (or all of them with `preserve_thinking`) keep
  their reasoning as `<think>\\n...\\n</think>\\n\\n`; earlier ones drop it;
* the generation prompt opens a think block, or an empty closed one with `enable_thinking=False`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

_TOOLS_INSTRUCTION = (
    "\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n"
    "</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\n"
    "that can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\n"
    "Reminder:\n- Function calls MUST follow the specified format: an inner "
    "<function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the "
    "function call, but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current "
    "knowledge and do not tell the user about function calls\n</IMPORTANT>"
)

# Names a message's reasoning may arrive under; transformers copies the first one present into
# `reasoning_content`, the field the Qwen template reads.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A conversation the chat template rejects (the template's own `raise_exception` messages)."""


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies messages the way transformers prepares them for a chat template.

    Keys whose value is None are dropped (OpenAI-style `content=None`), and reasoning given as
    `thinking` or `reasoning` is also exposed as `reasoning_content`.
    """
    normalized = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        normalized.append(message)
    return normalized


class _ContentRenderer:
    """`render_content` of the template: strings, None, or lists of text/image/video items."""

    def __init__(self, add_vision_id: bool):
        self.add_vision_id = add_vision_id
        self.images = 0
        self.videos = 0

    def __call__(self, content: Any, count: bool, is_system: bool = False) -> str:
        if isinstance(content, str):
            return content
        if content is None:
            return ""
        if isinstance(content, Mapping) or not isinstance(content, Sequence):
            raise ChatTemplateError("Unexpected content type.")
        parts = []
        for item in content:
            if not isinstance(item, Mapping):
                raise ChatTemplateError("Unexpected item type in content.")
            kind = item.get("type")
            if "image" in item or "image_url" in item or kind == "image":
                parts.append(self._vision("image", count, is_system))
            elif "video" in item or kind == "video":
                parts.append(self._vision("video", count, is_system))
            elif "text" in item:
                parts.append(str(item["text"]))
            else:
                raise ChatTemplateError("Unexpected item type in content.")
        return "".join(parts)

    def _vision(self, kind: str, count: bool, is_system: bool) -> str:
        if is_system:
            raise ChatTemplateError(f"System message cannot contain {kind}s.")
        if kind == "image":
            self.images += count
            label, pad = f"Picture {self.images}: ", "<|image_pad|>"
        else:
            self.videos += count
            label, pad = f"Video {self.videos}: ", "<|video_pad|>"
        return (label if self.add_vision_id else "") + f"<|vision_start|>{pad}<|vision_end|>"


def _last_query_index(messages: list[dict[str, Any]], content_of: _ContentRenderer) -> int:
    """Index of the last user message that is a real query, not only tool responses."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") != "user":
            continue
        content = content_of(messages[index].get("content"), count=False).strip()
        if not (content.startswith("<tool_response>") and content.endswith("</tool_response>")):
            return index
    raise ChatTemplateError("No user query found in messages.")


def _system_turn(messages: list[dict[str, Any]], tools: Any, content_of: _ContentRenderer) -> str:
    system = None
    if messages[0].get("role") == "system":
        system = content_of(messages[0].get("content"), count=False, is_system=True).strip()
    # The template's test is "tools and tools is iterable and tools is not mapping".
    if tools and isinstance(tools, Sequence) and not isinstance(tools, (str, Mapping)):
        lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        text = "# Tools\n\nYou have access to the following functions:\n\n<tools>" + lines
        text += "\n</tools>" + _TOOLS_INSTRUCTION + (f"\n\n{system}" if system else "")
        return f"<|im_start|>system\n{text}<|im_end|>\n"
    return "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"


def _split_reasoning(message: dict[str, Any], content: str) -> tuple[str, str]:
    """(reasoning, content): from `reasoning_content`, else parsed around `</think>` in content."""
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
    return reasoning.strip(), content


def _tool_calls(tool_calls: Any, content: str) -> str:
    if not tool_calls or isinstance(tool_calls, (str, Mapping)):
        return ""
    out = []
    for i, call in enumerate(tool_calls):
        call = call.get("function", call)
        if "name" not in call:
            raise ChatTemplateError(f"tool call without a name: {call!r}")
        lead = "\n" if i else ("\n\n" if content.strip() else "")
        out.append(f"{lead}<tool_call>\n<function={call['name']}>\n")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            # OpenAI-style JSON text; the Jinja template only accepts a mapping here.
            arguments = json.loads(arguments) if arguments.strip() else {}
        if not isinstance(arguments, Mapping):
            raise ChatTemplateError(f"tool call arguments must be a mapping, got {arguments!r}")
        for name, value in arguments.items():
            value = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            out.append(f"<parameter={name}>\n{value}\n</parameter>\n")
        out.append("</function>\n</tool_call>")
    return "".join(out)


def _pieces(
    messages: Sequence[Mapping[str, Any]],
    tools: Any,
    add_generation_prompt: bool,
    enable_thinking: bool,
    preserve_thinking: bool,
    add_vision_id: bool,
) -> Iterator[tuple[str, bool]]:
    """Yields (text, trainable) pieces whose concatenation is the rendered conversation.

    An assistant turn is trainable when it is rendered with its think block, i.e. after the last
    user query or with `preserve_thinking`: earlier turns appear without the think block the model
    always opens, so training on them would teach it to skip thinking. The trainable piece is
    everything after the `<|im_start|>assistant\\n` header up to and including `<|im_end|>`.
    """
    if not messages:
        raise ChatTemplateError("No messages provided.")
    messages = normalize_messages(messages)
    content_of = _ContentRenderer(add_vision_id)
    yield _system_turn(messages, tools, content_of), False
    last_query = _last_query_index(messages, content_of)
    for i, message in enumerate(messages):
        content = content_of(message.get("content"), count=True).strip()
        role = message.get("role")
        if role == "system":
            if i:
                raise ChatTemplateError("System message must be at the beginning.")
        elif role == "user":
            yield f"<|im_start|>user\n{content}<|im_end|>\n", False
        elif role == "assistant":
            reasoning, content = _split_reasoning(message, content)
            keep_reasoning = preserve_thinking is True or i > last_query
            body = f"<think>\n{reasoning}\n</think>\n\n{content}" if keep_reasoning else content
            body += _tool_calls(message.get("tool_calls"), content) + "<|im_end|>"
            yield "<|im_start|>assistant\n", False
            yield body, keep_reasoning
            yield "\n", False
        elif role == "tool":
            previous = messages[i - 1].get("role") if i else "tool"
            following = messages[i + 1].get("role") if i + 1 < len(messages) else None
            yield "<|im_start|>user" if previous != "tool" else "", False
            yield f"\n<tool_response>\n{content}\n</tool_response>", False
            yield "<|im_end|>\n" if following != "tool" else "", False
        else:
            raise ChatTemplateError("Unexpected message role.")
    if add_generation_prompt:
        think = "<think>\n" if enable_thinking is not False else "<think>\n\n</think>\n\n"
        yield "<|im_start|>assistant\n" + think, False


def render(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
    preserve_thinking: bool = False,
    add_vision_id: bool = False,
) -> str:
    """Renders a conversation in the Qwen3.6 chat format.

    Args:
        messages: OpenAI-style messages: `role` (system, user, assistant, tool), `content` (str,
            None, or a list of `{"type": "text", "text": ...}` / image / video items), and for
            assistants optional `reasoning_content` and `tool_calls` (`{"function": {"name",
            "arguments"}}` or `{"name", "arguments"}`; arguments a dict or a JSON string).
        tools: JSON schemas of the available functions, written into the system turn.
        add_generation_prompt: Append the header of the next assistant turn.
        enable_thinking: With False, the generation prompt closes an empty think block.
        preserve_thinking: Keep the reasoning of every past assistant turn, not only of the turns
            after the last user query.
        add_vision_id: Prefix images and videos with `Picture N: ` / `Video N: `.

    Returns:
        The prompt text, with special tokens written as text.

    Raises:
        ChatTemplateError: No messages, a system message after the first, an unknown role, no
            user query, or malformed content.
    """
    pieces = _pieces(
        messages, tools, add_generation_prompt, enable_thinking, preserve_thinking, add_vision_id
    )
    return "".join(text for text, _ in pieces)


def render_with_spans(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
    preserve_thinking: bool = False,
    add_vision_id: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """Renders a conversation and returns the character spans an SFT loss should train on.

    The arguments are those of `render` (but no generation prompt by default). A span covers an
    assistant turn's think block, content, tool calls and closing `<|im_end|>`, not its
    `<|im_start|>assistant\\n` header nor the newline after `<|im_end|>`. Only the turns rendered
    with their reasoning are spans: those after the last user query, or all with
    `preserve_thinking=True`.

    Returns:
        (text, spans): text equals `render(...)` with the same arguments; spans are sorted,
        non-overlapping `(start, end)` character offsets into it.
    """
    text, spans, offset = [], [], 0
    pieces = _pieces(
        messages, tools, add_generation_prompt, enable_thinking, preserve_thinking, add_vision_id
    )
    for piece, trainable in pieces:
        if trainable:
            spans.append((offset, offset + len(piece)))
        text.append(piece)
        offset += len(piece)
    return "".join(text), spans
