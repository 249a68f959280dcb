"""The Qwen3.6 chat format: hand-written expected strings, built-in == Jinja == transformers,
template errors, SFT spans, and the reply parser (render -> parse round trips)."""

from __future__ import annotations

import hashlib
import json

import pytest

from qwenjax.chat import (
    QWEN3_6_CHAT_TEMPLATE,
    ChatTemplateError,
    parse_reply,
    render,
    render_template,
    render_with_spans,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TOOLS_SYSTEM = (
    "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Current weather in'
    ' a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days":'
    ' {"type": "integer"}}, "required": ["city"]}}}\n</tools>\n\n'
    "If you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n"
    "</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\n"
    "that can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\n"
    "Reminder:\n- Function calls MUST follow the specified format: an inner <function=...>"
    "</function> block must be nested within <tool_call></tool_call> XML tags\n- Required "
    "parameters MUST be specified\n- You may provide optional reasoning for your function call in "
    "natural language BEFORE the function call, but NOT after\n- If there is no function call "
    "available, answer the question like normal with your current knowledge and do not tell the "
    "user about function calls\n</IMPORTANT>"
)


def _call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS = {
    "single": ([{"role": "user", "content": "What is 2+2?"}], None),
    "system": (
        [{"role": "system", "content": "  Be terse. "}, {"role": "user", "content": "Hi"}],
        None,
    ),
    "multi_turn": (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "<think>\nleaving\n</think>\n\nSee you"},
        ],
        None,
    ),
    "agent": (
        [
            {"role": "system", "content": "Be careful."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "reasoning_content": "need both",
                "tool_calls": [
                    _call("get_weather", city="Paris", days=2),
                    _call("get_weather", city="Rome"),
                ],
            },
            {"role": "tool", "content": "18C"},
            {"role": "tool", "content": "21C"},
            {"role": "assistant", "content": "Paris 18C, Rome 21C."},
        ],
        [WEATHER],
    ),
    "tool_args": (
        [
            {"role": "user", "content": "Search."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "name": "search",
                        "arguments": {
                            "q": "a b",
                            "n": 3,
                            "exact": True,
                            "tags": ["x", 1],
                            "m": {"k": None},
                        },
                    }
                ],
            },
            {"role": "tool", "content": '{"hits": []}'},
            {"role": "user", "content": "Thanks! Ça va? 你好"},
        ],
        [WEATHER],
    ),
    "legacy_tool_response": (
        [
            {"role": "user", "content": "Look it up."},
            {"role": "assistant", "content": "", "tool_calls": [_call("lookup", key="k")]},
            {"role": "user", "content": "<tool_response>\nv\n</tool_response>"},
            {"role": "assistant", "content": "It is v.", "thinking": "got it"},
        ],
        None,
    ),
    "vision": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "Same as"},
                    {"image_url": "u"},
                    {"type": "video"},
                ],
            }
        ],
        None,
    ),
}
FLAGS = [
    {},
    {"enable_thinking": False},
    {"preserve_thinking": True},
    {"add_generation_prompt": False},
    {"add_vision_id": True},
]


def test_template_is_the_published_qwen36_file():
    # Length and sha256 of Qwen/Qwen3.6-27B chat_template.jinja as recorded by public audits.
    data = QWEN3_6_CHAT_TEMPLATE.encode()
    assert len(data) == 7764
    assert hashlib.sha256(data).hexdigest().startswith("e84f32a23fdda276")


@pytest.mark.parametrize(
    ("name", "flags", "expected"),
    [
        (
            "single",
            {},
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n",
        ),
        (
            "single",
            {"enable_thinking": False},
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n",
        ),
        (
            "system",
            {"add_generation_prompt": False},
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
        ),
        (
            "multi_turn",
            {"add_generation_prompt": False},
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
            "<|im_start|>user\nBye<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nleaving\n</think>\n\nSee you<|im_end|>\n",
        ),
        (
            "multi_turn",
            {"preserve_thinking": True, "enable_thinking": False},
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\ngreet\n</think>\n\nHello!<|im_end|>\n"
            "<|im_start|>user\nBye<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nleaving\n</think>\n\nSee you<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n",
        ),
        (
            "agent",
            {"add_generation_prompt": False},
            TOOLS_SYSTEM
            + "\n\nBe careful.<|im_end|>\n<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nneed both\n</think>\n\nChecking.\n\n"
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n"
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"
            "<|im_end|>\n<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n"
            "<tool_response>\n21C\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\nParis 18C, Rome 21C.<|im_end|>\n",
        ),
        (
            "tool_args",
            {},
            TOOLS_SYSTEM
            + "<|im_end|>\n<|im_start|>user\nSearch.<|im_end|>\n<|im_start|>assistant\n"
            "<tool_call>\n<function=search>\n<parameter=q>\na b\n</parameter>\n<parameter=n>\n3\n"
            "</parameter>\n<parameter=exact>\ntrue\n</parameter>\n<parameter=tags>\n"
            '["x", 1]\n</parameter>\n<parameter=m>\n{"k": null}\n</parameter>\n</function>\n'
            "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n"
            '{"hits": []}\n</tool_response><|im_end|>\n'
            "<|im_start|>user\nThanks! Ça va? 你好<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n",
        ),
        (
            "legacy_tool_response",
            {"add_generation_prompt": False},
            "<|im_start|>user\nLook it up.<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
            "<tool_call>\n<function=lookup>\n<parameter=key>\nk\n</parameter>\n</function>\n"
            "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nv\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n<think>\ngot it\n</think>\n\nIt is v.<|im_end|>\n",
        ),
        (
            "vision",
            {"add_vision_id": True},
            "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Same as"
            "Picture 2: <|vision_start|><|image_pad|><|vision_end|>"
            "Video 1: <|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
            "<|im_start|>assistant\n<think>\n",
        ),
    ],
)
def test_render_matches_hand_written(name, flags, expected):
    messages, tools = CONVERSATIONS[name]
    assert render(messages, tools, **flags) == expected


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f) or "default")
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_builtin_equals_jinja_template(name, flags):
    messages, tools = CONVERSATIONS[name]
    assert render(messages, tools, **flags) == render_template(
        QWEN3_6_CHAT_TEMPLATE, messages, tools, **flags
    )


def test_jinja_rendering_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from qwenjax.testing.tiny_data import load_tiny_tokenizer

    ours = load_tiny_tokenizer(tmp_path)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for name, (messages, tools) in sorted(CONVERSATIONS.items()):
        for flags in FLAGS:
            expected = theirs.apply_chat_template(
                messages, tools=tools, tokenize=False, **{"add_generation_prompt": True, **flags}
            )
            assert ours.apply_chat_template(messages, tools, **flags) == expected, (name, flags)
            assert ours.encode(expected) == theirs.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "No messages provided."),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
            "System message must be at the beginning.",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "critic", "content": "b"}],
            "Unexpected message role.",
        ),
        (
            [{"role": "system", "content": "s"}, {"role": "tool", "content": "t"}],
            "No user query found in messages.",
        ),
        (
            [{"role": "user", "content": "<tool_response>x</tool_response>"}],
            "No user query found in messages.",
        ),
        (
            [{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "a"}],
            "System message cannot contain images.",
        ),
        ([{"role": "user", "content": [{"type": "audio"}]}], "Unexpected item type in content."),
        ([{"role": "user", "content": 3}], "Unexpected content type."),
    ],
)
@pytest.mark.parametrize("renderer", ["builtin", "jinja"])
def test_template_errors(renderer, messages, message):
    with pytest.raises(ChatTemplateError, match=message):
        if renderer == "builtin":
            render(messages)
        else:
            render_template(QWEN3_6_CHAT_TEMPLATE, messages)


def test_jinja_environment_behaves_like_transformers():
    template = (
        "{{ tools | tojson }}|{{ {'b': '<é>', 'a': 1} | tojson(indent=1) }}|"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}"
        "{% endif %}{% set ns.n = ns.n + 1 %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% endfor %}|{{ ns.n }}|{{ strftime_now('%Y') | length }}|{{ dict(x=1).x }}\n"
        "  {% if true %}\nX\n  {% endif %}\n"
    )
    messages = [
        {"role": "user", "content": "a", "tool_calls": None},
        {"role": "user", "content": "b"},
    ]
    out = render_template(template, messages, [{"n": "ü"}])
    assert out == '[{"n": "ü"}]|{\n "b": "<é>",\n "a": 1\n}|a|1|4|1\nX\n'
    with pytest.raises(Exception, match="starts with '_'"):
        render_template("{% set ns = namespace(_x=1) %}", messages)


SPAN_CASES = {
    # name: (flags, expected trained assistant bodies)
    "multi_turn": ({}, ["<think>\nleaving\n</think>\n\nSee you<|im_end|>"]),
    "multi_turn-preserve": (
        {"preserve_thinking": True},
        [
            "<think>\ngreet\n</think>\n\nHello!<|im_end|>",
            "<think>\nleaving\n</think>\n\nSee you<|im_end|>",
        ],
    ),
    "agent": (
        {},
        [
            "<think>\nneed both\n</think>\n\nChecking.\n\n<tool_call>\n<function=get_weather>\n"
            "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n"
            "</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n"
            "</function>\n</tool_call><|im_end|>",
            "<think>\n\n</think>\n\nParis 18C, Rome 21C.<|im_end|>",
        ],
    ),
    "tool_args": ({}, []),  # the last user query comes after the only assistant turn
}


@pytest.mark.parametrize("case", sorted(SPAN_CASES))
def test_render_with_spans(case):
    flags, bodies = SPAN_CASES[case]
    messages, tools = CONVERSATIONS[case.split("-")[0]]
    text, spans = render_with_spans(messages, tools, **flags)
    assert text == render(messages, tools, add_generation_prompt=False, **flags)
    assert [text[a:b] for a, b in spans] == bodies
    for a, b in spans:
        assert text[:a].endswith("<|im_start|>assistant\n") and text[b:].startswith("\n")


REPLIES = [
    {"reasoning_content": "think hard", "content": "The answer is 4."},
    {"reasoning_content": "", "content": "No reasoning; two\nlines."},
    {
        "reasoning_content": "use a tool",
        "content": "",
        "tool_calls": [
            _call(
                "f",
                text="multi\nline\n",
                n=3,
                ok=False,
                items=[1, "x"],
                nested={"k": None},
                empty="",
            )
        ],
    },
    {
        "reasoning_content": "two calls",
        "content": "Let me check.",
        "tool_calls": [_call("get_weather", city="Paris", days=2), _call("noop")],
    },
]


@pytest.mark.parametrize("reply", REPLIES, ids=range(len(REPLIES)))
@pytest.mark.parametrize("strip_think", [False, True], ids=["with_think", "prompt_has_think"])
def test_parse_reply_round_trips_render(reply, strip_think):
    text = render(
        [{"role": "user", "content": "q"}, {"role": "assistant", **reply}],
        add_generation_prompt=False,
    )
    generated = text.split("<|im_start|>assistant\n")[-1].removesuffix("\n")
    if strip_think:
        generated = generated.removeprefix("<think>\n")
    parsed = parse_reply(generated)
    assert parsed["reasoning"] == reply["reasoning_content"]
    assert parsed["content"] == reply["content"]
    expected = [c["function"] for c in reply.get("tool_calls", [])]
    assert parsed["tool_calls"] == [
        {"name": c["name"], "arguments": c["arguments"]} for c in expected
    ]


def test_parse_reply_edge_cases():
    assert parse_reply("Just content.") == {
        "reasoning": "",
        "content": "Just content.",
        "tool_calls": [],
    }
    truncated = "still thinking about"
    assert parse_reply(truncated, thinking_open=True)["reasoning"] == truncated
    assert parse_reply("<think>\nstill", thinking_open=False)["reasoning"] == "still"
    # A string parameter that looks like JSON stays a string when the schema says so.
    call = "</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\n123\n</parameter>\n"
    call += "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    assert parse_reply(call)["tool_calls"][0]["arguments"] == {"city": 123, "days": 3}
    assert parse_reply(call, tools=[WEATHER])["tool_calls"][0]["arguments"] == {
        "city": "123",
        "days": 3,
    }
    # Unterminated or malformed blocks are dropped; the content before them is kept.
    assert parse_reply("Hi <tool_call>\n<function=f>\n<parameter=a>\n1")["tool_calls"] == []
    assert parse_reply("<tool_call>junk</tool_call>") == {
        "reasoning": "",
        "content": "",
        "tool_calls": [],
    }
    assert json.loads(json.dumps(parse_reply(call)))  # plain JSON-serialisable dicts
