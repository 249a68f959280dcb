"""Qwen3.6 chat format: the built-in renderer, Jinja rendering of a checkpoint's own template,
and the parser that splits a generated reply into reasoning, content and tool calls."""

from qwenjax.chat.jinja import render_template
from qwenjax.chat.parse import ParsedReply, ToolCall, parse_reply
from qwenjax.chat.render import ChatTemplateError, normalize_messages, render, render_with_spans
from qwenjax.chat.template import QWEN3_6_CHAT_TEMPLATE

__all__ = [
    "QWEN3_6_CHAT_TEMPLATE",
    "ChatTemplateError",
    "ParsedReply",
    "ToolCall",
    "normalize_messages",
    "parse_reply",
    "render",
    "render_template",
    "render_with_spans",
]
