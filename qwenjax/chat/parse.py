"""Splitting a generated assistant reply into reasoning, content and XML tool calls.

The inverse of how `render` writes an assistant turn: `<think>\\nREASONING\\n</think>\\n\\n`, then
the content, then `<tool_call>` blocks in the Qwen3-Coder XML format. The generation prompt
usually ends with `<think>\\n` already, so the generated text may or may not start with `<think>`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

_STOP_SUFFIXES = ("<|im_end|>", "<|endoftext|>")
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
# A value is framed by exactly one newline on each side; it may itself span several lines.
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


class ToolCall(TypedDict):
    """One parsed tool call: the function name and its decoded arguments."""

    name: str
    arguments: dict[str, Any]


class ParsedReply(TypedDict):
    """A reply split into its parts; empty strings / list where a part is absent."""

    reasoning: str
    content: str
    tool_calls: list[ToolCall]


def _string_parameters(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, set[str]]:
    """Function name -> parameters whose JSON schema type is string (kept raw, never decoded)."""
    out: dict[str, set[str]] = {}
    for tool in tools or ():
        function = tool.get("function", tool)
        properties = function.get("parameters", {}).get("properties", {})
        out[function.get("name", "")] = {
            name for name, schema in properties.items() if schema.get("type") == "string"
        }
    return out


def _decode(value: str, keep_raw: bool) -> Any:
    # The template writes strings raw and everything else as JSON, so JSON that parses was
    # (almost always) a non-string; the tool schema settles the ambiguous cases like "3".
    if keep_raw:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _parse_tool_call(block: str, string_params: dict[str, set[str]]) -> ToolCall | None:
    match = _FUNCTION.search(block)
    if match is None:
        return None
    name = match.group(1).strip()
    raw = string_params.get(name, set())
    arguments = {
        key.strip(): _decode(value, key.strip() in raw)
        for key, value in _PARAMETER.findall(match.group(2))
    }
    return ToolCall(name=name, arguments=arguments)


def parse_reply(
    text: str,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking_open: bool = False,
) -> ParsedReply:
    """Splits generated assistant text into reasoning, content and tool calls.

    Args:
        text: The generated text, with or without the leading `<think>` (the prompt usually
            contains it) and with or without a trailing `<|im_end|>`.
        tools: The tool schemas given to the model; parameters typed `string` are kept as raw
            text instead of being JSON-decoded.
        thinking_open: The prompt ended inside an open think block (thinking on), so text that
            never reaches `</think>` (a truncated reply) is all reasoning rather than content.

    Returns:
        `{"reasoning", "content", "tool_calls": [{"name", "arguments"}]}`, reasoning and content
        stripped. Argument values are JSON-decoded when they parse as JSON, else raw strings.
        Tool-call blocks without a `<function=...>` or without their closing tag are dropped.
    """
    for suffix in _STOP_SUFFIXES:
        text = text.removesuffix(suffix)
    reasoning = ""
    if "</think>" in text:
        reasoning, text = text.split("</think>", 1)
        reasoning = reasoning.split("<think>")[-1]
    elif text.lstrip().startswith("<think>") or thinking_open:
        reasoning, text = text.split("<think>")[-1], ""
    content, _, calls_text = text.partition("<tool_call>")
    string_params = _string_parameters(tools)
    calls = [
        _parse_tool_call(b, string_params) for b in _TOOL_CALL.findall("<tool_call>" + calls_text)
    ]
    return ParsedReply(
        reasoning=reasoning.strip(),
        content=content.strip(),
        tool_calls=[call for call in calls if call is not None],
    )
