"""The incremental reply parser: a table of replies, each fed whole, one token at a time and in
random chunks; every split must collect to the same result (streaming == non-streaming)."""

from __future__ import annotations

import json
import random
import re

import pytest

from qwenjax.chat import parse_reply
from qwenjax.serve.stream_parser import (
    Content,
    Reasoning,
    ReplyParser,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
    collect,
    parse,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    },
    {"name": "write", "input_schema": {"properties": {"text": {"type": ["string", "null"]}}}},
]

CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)
CALL_ARGS = '{"city": "Paris", "days": 3}'
WRITE = (
    '<tool_call>\n<function=write>\n<parameter=text>\nline "1"\n\n  <b>\n</parameter>\n'
    "</function>\n</tool_call>"
)
WRITE_ARGS = json.dumps({"text": 'line "1"\n\n  <b>'})

# (id, text, thinking_open, expected reasoning, content, [(name, arguments)])
CASES = [
    ("plain", "Hello world.", False, "", "Hello world.", []),
    ("strip", "\n\n  Hello\n world  \n", False, "", "Hello\n world", []),
    (
        "thinking",
        "Let me think.\n</think>\n\nThe answer.",
        True,
        "Let me think.",
        "The answer.",
        [],
    ),
    ("thinking-cut", "still thinking <tool", True, "still thinking <tool", "", []),
    ("own-think", "<think>\nhmm\n</think>\n\nok", False, "hmm", "ok", []),
    ("late-think-is-prose", "a <think> b", False, "", "a <think> b", []),
    ("empty-think", "<think>\n\n</think>\n\nok", False, "", "ok", []),
    ("call", "Sure.\n\n" + CALL, False, "", "Sure.", [("get_weather", CALL_ARGS)]),
    (
        "think-call",
        "Need weather.\n</think>\n\n" + CALL,
        True,
        "Need weather.",
        "",
        [("get_weather", CALL_ARGS)],
    ),
    (
        "call-in-reasoning",
        "plan " + CALL + " more\n</think>\nok",
        True,
        "plan  more",
        "ok",
        [("get_weather", CALL_ARGS)],
    ),
    (
        "two-calls",
        CALL + "\n" + WRITE,
        False,
        "",
        "",
        [("get_weather", CALL_ARGS), ("write", WRITE_ARGS)],
    ),
    (
        "prose-tag",
        "Use <tool_call> tags like this.",
        False,
        "",
        "Use <tool_call> tags like this.",
        [],
    ),
    ("prose-tag-end", "Write <tool_call>", False, "", "Write <tool_call>", []),
    ("prose-tag-space", "x <tool_call>\n<func", False, "", "x <tool_call>\n<func", []),
    (
        "unfinished-name",
        "a\n<tool_call>\n<function=get_wea",
        False,
        "",
        "a\n<tool_call>\n<function=get_wea",
        [],
    ),
    (
        "newline-in-name",
        "<tool_call>\n<function=a\nb>",
        False,
        "",
        "<tool_call>\n<function=a\nb>",
        [],
    ),
    (
        "cut-in-value",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
        False,
        "",
        "",
        [("get_weather", '{"city": "Par"}')],
    ),
    (
        "cut-in-json",
        "<tool_call>\n<function=get_weather>\n<parameter=days>\n1",
        False,
        "",
        "",
        [("get_weather", '{"days": 1}')],
    ),
    (
        "no-params",
        "<tool_call>\n<function=now>\n</function>\n</tool_call>",
        False,
        "",
        "",
        [("now", "{}")],
    ),
    (
        "untyped-values",
        "<tool_call>\n<function=f>\n<parameter=a>\n[1, 2]\n</parameter>\n<parameter=b>\nhi\n"
        "</parameter>\n</function>\n</tool_call>",
        False,
        "",
        "",
        [("f", '{"a": [1, 2], "b": "hi"}')],
    ),
    (
        "missing-function-close",
        "<tool_call>\n<function=now>\n</tool_call>after",
        False,
        "",
        "after",
        [("now", "{}")],
    ),
    (
        "text-after-call",
        "Sure.\n" + CALL + "\nDone.\n",
        False,
        "",
        "Sure.\n\nDone.",
        [("get_weather", CALL_ARGS)],
    ),
    ("unicode", "é😀 <tool_call>x", False, "", "é😀 <tool_call>x", []),
]


# The cases where `parse_reply` (the offline parser) gives the same answer; it drops unfinished
# calls, prose after a <tool_call> and calls inside reasoning.
WELL_FORMED = {
    "plain",
    "strip",
    "thinking",
    "own-think",
    "empty-think",
    "call",
    "think-call",
    "two-calls",
    "no-params",
    "untyped-values",
}


def token_split(text: str) -> list[str]:
    """Tags as single tokens (as Qwen's added tokens are), everything else character by
    character."""
    return [t for t in re.split(r"(<tool_call>|</tool_call>|<think>|</think>)|", text) if t]


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def run(chunks, thinking_open, tools=TOOLS):
    parser = ReplyParser(thinking_open=thinking_open, tools=tools)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    return events


def check_events(events):
    """Event order and the JSON-prefix property of streamed arguments."""
    args: dict[int, str] = {}
    open_calls = set()
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.index == len(args)
            args[e.index] = ""
            open_calls.add(e.index)
        elif isinstance(e, ToolCallArgs):
            assert e.index in open_calls and e.text
            args[e.index] += e.text
        elif isinstance(e, ToolCallEnd):
            open_calls.remove(e.index)
            json.loads(args[e.index])
        else:
            assert isinstance(e, (Reasoning, Content)) and e.text
    assert not open_calls


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_split_parses_the_same(case):
    _, text, thinking_open, reasoning, content, calls = case
    whole = collect(run([text], thinking_open))
    assert (whole.reasoning, whole.content) == (reasoning, content)
    assert [(c.name, c.arguments) for c in whole.tool_calls] == calls
    rng = random.Random(hash(text) % 1000)
    splits = [token_split(text), list(text)] + [random_split(text, rng) for _ in range(30)]
    for chunks in splits:
        events = run(chunks, thinking_open)
        check_events(events)
        assert collect(events) == whole, chunks


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in WELL_FORMED], ids=str)
def test_agrees_with_parse_reply_on_well_formed_replies(case):
    _, text, thinking_open, *_ = case
    ours = parse(text, thinking_open=thinking_open, tools=TOOLS)
    theirs = parse_reply(text, thinking_open=thinking_open, tools=TOOLS)
    assert ours.reasoning == theirs["reasoning"] and ours.content == theirs["content"]
    assert [(c.name, json.loads(c.arguments)) for c in ours.tool_calls] == [
        (c["name"], c["arguments"]) for c in theirs["tool_calls"]
    ]


def test_arguments_stream_while_a_string_value_is_written():
    parser = ReplyParser(tools=TOOLS)
    events = parser.feed("<tool_call>\n<function=write>\n<parameter=text>\nabc")
    assert events[0] == ToolCallStart(0, "write")
    assert "".join(e.text for e in events if isinstance(e, ToolCallArgs)) == '{"text": "abc'
    assert parser.feed("\n") == []  # could be the newline before </parameter>
    assert parser.feed("d") == [ToolCallArgs(0, "\\nd")]


def test_prose_tag_is_released_as_soon_as_it_is_refuted():
    parser = ReplyParser(tools=TOOLS)
    assert parser.feed("see <tool_call>") == [Content("see")]
    assert parser.feed(" and") == [Content(" <tool_call> and")]


def test_tool_parsing_off_keeps_the_xml_as_content():
    result = parse("ok " + CALL, parse_tool_calls=False)
    assert result.content == "ok " + CALL and not result.tool_calls


def test_in_reasoning_tracks_the_state():
    parser = ReplyParser(thinking_open=True)
    parser.feed("abc")
    assert parser.in_reasoning
    parser.feed("</think>x")
    assert not parser.in_reasoning
