"""Incremental reply parser: generated text in (any split), reasoning / content / tool calls out.

A Qwen3.6 reply is `REASONING </think> CONTENT` followed by zero or more tool calls in the
Qwen3-Coder XML format::

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

`ReplyParser` is a state machine fed text deltas (`feed`) and closed with `finish`; it returns
ordered events (`Reasoning`, `Content`, `ToolCallStart`, `ToolCallArgs`, `ToolCallEnd`). The
non-streaming routes feed the whole text through the same machine and `collect` the events, and
the machine only decides on characters it has seen (it holds back what could still be the start
of a tag), so the collected result is the same for every way of splitting the text: streaming
equals non-streaming. The rules (SERVING.md §1):

* The start state comes from the rendered prompt (`thinking_open`: it ended in `<think>\\n`),
  not from request flags. A reply starting with `<think>` opens reasoning anyway.
* Reasoning and content are each stripped of leading and trailing whitespace (as `parse_reply`
  does): trailing whitespace is held until more text shows it is inner whitespace. Text on both
  sides of a tool call joins with the whitespace around the call.
* `<tool_call>` is only held back until `<function=NAME>` confirms it; anything else after the tag
  refutes it and the tag is flushed as ordinary text, never swallowed. A tool call written inside
  reasoning is still a tool call.
* Arguments stream as a JSON object: `{` when the call is confirmed, then `"ARG": VALUE` per
  parameter. A parameter whose schema type is `string` keeps its raw text and streams character
  by character as a JSON string; any other value is JSON-decoded when it parses (else kept as a
  string) and sent once its `</parameter>` arrives. The concatenated `ToolCallArgs` texts are the
  final arguments string, and every prefix of it is a prefix of that string.
* At the end of generation, text held back as a possible tag is flushed as text, and a
  `<tool_call>` whose `<function=NAME>` never completed comes back as text. A call whose name was
  confirmed but that was cut off (max tokens) is closed as a call — its name and argument prefix
  were already streamed, and the non-streaming result must equal the streamed one — with the
  parameters written so far (a cut-off value is kept as far as it got) and valid JSON arguments.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from qwenjax.inference.text import partial_stop_length

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"
VALUE_END = "\n" + PARAMETER_CLOSE
# A function or parameter name longer than this refutes the tag instead of being held forever.
MAX_NAME_LENGTH = 256

_WHITESPACE = " \t\r\n"


@dataclasses.dataclass(frozen=True)
class Reasoning:
    text: str


@dataclasses.dataclass(frozen=True)
class Content:
    text: str


@dataclasses.dataclass(frozen=True)
class ToolCallStart:
    index: int
    name: str


@dataclasses.dataclass(frozen=True)
class ToolCallArgs:
    index: int
    text: str


@dataclasses.dataclass(frozen=True)
class ToolCallEnd:
    index: int


Event = Reasoning | Content | ToolCallStart | ToolCallArgs | ToolCallEnd


@dataclasses.dataclass
class ParsedCall:
    name: str
    arguments: str  # the JSON object text


@dataclasses.dataclass
class Parsed:
    """The collected result of a whole reply."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ParsedCall] = dataclasses.field(default_factory=list)


def collect(events: Iterable[Event], into: Parsed | None = None) -> Parsed:
    """Concatenates events into a `Parsed` (extending `into` when given)."""
    out = into if into is not None else Parsed()
    for event in events:
        if isinstance(event, Reasoning):
            out.reasoning += event.text
        elif isinstance(event, Content):
            out.content += event.text
        elif isinstance(event, ToolCallStart):
            out.tool_calls.append(ParsedCall(event.name, ""))
        elif isinstance(event, ToolCallArgs):
            out.tool_calls[event.index].arguments += event.text
    return out


def merge_events(events: Iterable[Event]) -> list[Event]:
    """Joins adjacent text events of one kind and adjacent argument pieces of one call."""
    merged: list[Event] = []
    for event in events:
        last = merged[-1] if merged else None
        if type(event) is type(last) and isinstance(event, (Reasoning, Content)):
            merged[-1] = type(event)(last.text + event.text)
        elif isinstance(event, ToolCallArgs) and isinstance(last, ToolCallArgs):
            merged[-1] = ToolCallArgs(event.index, last.text + event.text)
        else:
            merged.append(event)
    return merged


def string_parameters(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, set[str]]:
    """Function name -> its parameters typed `string` (OpenAI `function.parameters` or
    Anthropic `input_schema`), whose values are kept as raw text."""
    out: dict[str, set[str]] = {}
    for tool in tools or ():
        function = tool.get("function", tool) if isinstance(tool, Mapping) else {}
        schema = function.get("parameters") or function.get("input_schema") or {}
        properties = schema.get("properties", {}) if isinstance(schema, Mapping) else {}
        names = set()
        for name, prop in properties.items() if isinstance(properties, Mapping) else ():
            kind = prop.get("type") if isinstance(prop, Mapping) else None
            if kind == "string" or (isinstance(kind, list) and set(kind) <= {"string", "null"}):
                names.add(name)
        out[str(function.get("name", ""))] = names
    return out


def _decode_value(value: str) -> Any:
    # The template writes strings raw and everything else as JSON (see `qwenjax.chat.parse`).
    try:
        return json.loads(value)
    except ValueError:
        return value


# Parser modes.
_REASONING, _CONTENT = "reasoning", "content"
_OPEN = "open"  # after <tool_call>: waiting for <function=NAME> to confirm or refute
_BODY = "body"  # inside <function=...>, between parameters
_VALUE_START = "value_start"  # right after <parameter=NAME>: one newline to skip
_VALUE = "value"
_CLOSE = "close"  # after </function>: an optional </tool_call>


class ReplyParser:
    """Feed generated text with `feed`, end with `finish`; both return new events in order.

    Args:
        thinking_open: The prompt ended inside `<think>` (`inference.text.opens_thinking`).
        tools: The tool schemas of the request (for the string-typed parameters).
        parse_tool_calls: Recognise `<tool_call>` blocks (False: they are ordinary text, e.g.
            when the request has no tools or `tool_choice` is "none").
    """

    def __init__(
        self,
        *,
        thinking_open: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        parse_tool_calls: bool = True,
    ):
        self._mode = _REASONING if thinking_open else _CONTENT
        self._outer = self._mode  # the text mode a tool call returns to
        self._parse_calls = parse_tool_calls
        self._string_params = string_parameters(tools)
        self._buf = ""
        self._events: list[Event] = []
        self._at_start = True  # nothing but whitespace seen so far: a leading <think> opens
        self._started = False  # the current text segment has emitted non-whitespace
        self._pending_ws = ""  # trailing whitespace of the current segment, held back
        self._calls = 0
        self._call_params = 0  # parameters written in the current call
        self._raw_value = False  # the current parameter streams as a raw JSON string
        self._value = ""  # a non-string value accumulated until its </parameter>
        self.finished = False

    @property
    def in_reasoning(self) -> bool:
        """Whether the text fed so far leaves the reply inside its reasoning."""
        return self._outer == _REASONING and self._mode in (_REASONING, _OPEN)

    @property
    def num_tool_calls(self) -> int:
        return self._calls

    def feed(self, text: str) -> list[Event]:
        if self.finished:
            raise ValueError("the parser has finished")
        self._buf += text
        self._drain(final=False)
        return self._take()

    def finish(self) -> list[Event]:
        if not self.finished:
            self._drain(final=True)
            if self._mode in (_BODY, _VALUE_START, _VALUE):
                self._close_value()
                self._end_call()
            self.finished = True
        return self._take()

    def _take(self) -> list[Event]:
        events, self._events = merge_events(self._events), []
        return events

    # ------------------------------------------------------------------ text segments
    def _text(self, text: str) -> None:
        """Emit reasoning / content of the current text mode, stripped at segment edges."""
        if not text:
            return
        if not self._started:
            text = text.lstrip(_WHITESPACE)
            if not text:
                return
            self._started = True
        full = self._pending_ws + text
        body = full.rstrip(_WHITESPACE)
        self._pending_ws = full[len(body) :]
        if body:
            self._at_start = False
            self._events.append(Reasoning(body) if self._mode == _REASONING else Content(body))

    def _new_segment(self, mode: str) -> None:
        self._mode = self._outer = mode
        self._started = False
        self._pending_ws = ""

    def _text_tags(self) -> list[str]:
        tags = []
        if self._parse_calls:
            tags.append(CALL_OPEN)
        if self._mode == _REASONING:
            tags += [THINK_CLOSE, THINK_OPEN]
        elif self._at_start:
            tags.append(THINK_OPEN)
        return tags

    # ------------------------------------------------------------------ the machine
    def _drain(self, final: bool) -> None:
        while True:
            step = getattr(self, "_step_" + self._mode)
            if not step(final):
                return

    def _step_reasoning(self, final: bool) -> bool:
        return self._step_text(final)

    def _step_content(self, final: bool) -> bool:
        return self._step_text(final)

    def _step_text(self, final: bool) -> bool:
        tags = self._text_tags()
        found = min(
            ((i, tag) for tag in tags if (i := self._buf.find(tag)) >= 0),
            default=None,
            key=lambda hit: hit[0],
        )
        if found is None:
            hold = 0 if final else partial_stop_length(self._buf, tags)
            self._text(self._buf[: len(self._buf) - hold])
            self._buf = self._buf[len(self._buf) - hold :]
            return False
        i, tag = found
        self._text(self._buf[:i])
        self._buf = self._buf[i + len(tag) :]
        if tag == THINK_CLOSE:
            self._new_segment(_CONTENT)
        elif tag == THINK_OPEN:
            # A reply that opens its own think block; inside reasoning the tag is dropped, and
            # after content it is prose (decided after the text before it was emitted).
            if self._mode == _CONTENT:
                if self._at_start:
                    self._new_segment(_REASONING)
                else:
                    self._text(tag)
        else:
            self._mode = _OPEN
        return True

    def _refute(self) -> None:
        """The `<tool_call>` tag was prose: flush it as text; what follows is text again."""
        self._mode = self._outer
        self._text(CALL_OPEN)

    def _step_open(self, final: bool) -> bool:
        rest = self._buf.lstrip(_WHITESPACE)
        if len(rest) < len(FUNCTION_OPEN):
            if FUNCTION_OPEN.startswith(rest) and not final:
                return False
            self._refute()
            return True
        if not rest.startswith(FUNCTION_OPEN):
            self._refute()
            return True
        end = rest.find(">", len(FUNCTION_OPEN))
        name = rest[len(FUNCTION_OPEN) : end if end >= 0 else len(rest)]
        if "\n" in name or len(name) > MAX_NAME_LENGTH or (end >= 0 and not name.strip()):
            self._refute()
            return True
        if end < 0:
            if final:
                self._refute()
                return True
            return False
        self._buf = rest[end + 1 :]
        self._at_start = False
        self._function = name.strip()
        self._events.append(ToolCallStart(self._calls, self._function))
        self._args("{")
        self._call_params = 0
        self._mode = _BODY
        return True

    def _args(self, text: str) -> None:
        if text:
            self._events.append(ToolCallArgs(self._calls, text))

    def _end_call(self) -> None:
        self._args("}")
        self._events.append(ToolCallEnd(self._calls))
        self._calls += 1

    def _step_body(self, final: bool) -> bool:
        self._buf = self._buf.lstrip(_WHITESPACE)
        buf = self._buf
        if buf.startswith(PARAMETER_OPEN):
            end = buf.find(">", len(PARAMETER_OPEN))
            name = buf[len(PARAMETER_OPEN) : end if end >= 0 else len(buf)]
            if "\n" in name or len(name) > MAX_NAME_LENGTH:
                self._buf = buf[len(PARAMETER_OPEN) :]  # not a parameter: skip the junk
                return True
            if end < 0:
                if final:
                    self._buf = ""
                return False
            name = name.strip()
            self._buf = buf[end + 1 :]
            self._raw_value = name in self._string_params.get(self._function, set())
            self._value = ""
            sep = ", " if self._call_params else ""
            self._args(sep + json.dumps(name, ensure_ascii=False) + ": ")
            if self._raw_value:
                self._args('"')
            self._call_params += 1
            self._mode = _VALUE_START
            return True
        for tag in (FUNCTION_CLOSE, CALL_CLOSE):
            if buf.startswith(tag):
                self._buf = buf[len(tag) :]
                self._end_call()
                self._mode = _CLOSE if tag == FUNCTION_CLOSE else self._outer
                return True
        tags = (PARAMETER_OPEN, FUNCTION_CLOSE, CALL_CLOSE)
        if not buf or (not final and any(tag.startswith(buf) for tag in tags)):
            return False
        # Text between parameters is not part of the call (as in `parse_reply`): skip it.
        cut = buf.find("<", 1)
        self._buf = buf[cut:] if cut >= 0 else ""
        return True

    def _step_value_start(self, final: bool) -> bool:
        if not self._buf:
            return False
        if self._buf.startswith("\n"):
            self._buf = self._buf[1:]
        self._mode = _VALUE
        return True

    def _value_text(self, text: str) -> None:
        if self._raw_value:
            self._args(json.dumps(text, ensure_ascii=False)[1:-1])
        else:
            self._value += text

    def _close_value(self) -> None:
        """End the current parameter's JSON value (also for a value cut off at the end)."""
        if self._mode not in (_VALUE, _VALUE_START):
            return
        if self._raw_value:
            self._args('"')
        else:
            self._args(json.dumps(_decode_value(self._value), ensure_ascii=False))
        self._mode = _BODY

    def _step_value(self, final: bool) -> bool:
        i = self._buf.find(PARAMETER_CLOSE)
        if i < 0:
            hold = 0 if final else partial_stop_length(self._buf, (VALUE_END,))
            self._value_text(self._buf[: len(self._buf) - hold])
            self._buf = self._buf[len(self._buf) - hold :]
            return False
        value = self._buf[:i]
        self._value_text(value[:-1] if value.endswith("\n") else value)
        self._buf = self._buf[i + len(PARAMETER_CLOSE) :]
        self._close_value()
        return True

    def _step_close(self, final: bool) -> bool:
        self._buf = self._buf.lstrip(_WHITESPACE)
        if self._buf.startswith(CALL_CLOSE):
            self._buf = self._buf[len(CALL_CLOSE) :]
        elif not self._buf or (not final and CALL_CLOSE.startswith(self._buf)):
            return False
        self._mode = self._outer
        return True


def parse(
    text: str,
    *,
    thinking_open: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    parse_tool_calls: bool = True,
) -> Parsed:
    """The whole-text result of `ReplyParser` (what the non-streaming routes return)."""
    parser = ReplyParser(
        thinking_open=thinking_open, tools=tools, parse_tool_calls=parse_tool_calls
    )
    return collect([*parser.feed(text), *parser.finish()])
