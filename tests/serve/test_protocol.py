"""The HTTP layer over a scheduler double: every route through the official `openai` and
`anthropic` SDKs, with the output scripted token by token (a few tokens per event, as MTP
speculation delivers them). Fast (no model); the real engine is covered by test_serve.py."""

from __future__ import annotations

import json
import time

import anthropic
import openai
import pytest

from qwenjax.serve.app import build_app
from qwenjax.serve.common import ServerState
from qwenjax.testing.tiny_data import load_tiny_tokenizer
from tests.serve.fake_scheduler import FakeScheduler
from tests.serve.server_util import ThreadServer, http, metric

KEY = "test-key"
MODEL = "qwen/test"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)
REASONED = "I should look it up.\n</think>\n\nLet me check.\n\n" + CALL + "<|im_end|>"
ANSWER = "Sunny, 20 degrees.<|im_end|>"  # with thinking off
THOUGHT_ANSWER = "Got it.\n</think>\n\n" + ANSWER


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def sched(tok):
    return FakeScheduler(
        tok.encode("Thinking.\n</think>\n\nHello!<|im_end|>"), stop_token_ids=tok.eos_token_ids
    )


@pytest.fixture(scope="module")
def server(tok, sched):
    state = ServerState(
        scheduler=sched,
        tokenizer=tok,
        model_name=MODEL,
        max_length=4096,
        vocab_size=512,
        api_key=KEY,
        enable_test_hooks=True,
    )
    with ThreadServer(build_app(state)) as srv:
        yield srv
    assert sched.started and sched.stopped


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.base, api_key=KEY, max_retries=0)


@pytest.fixture(autouse=True)
def events_of(sched):
    """Each test starts with 3 tokens per event; the slots must be free again after it."""
    sched.tokens_per_event = 3
    yield
    deadline = time.monotonic() + 5
    while sched.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sched.active, "a request kept its slot"


def forced(text: str) -> dict:
    return {"qwenjax_forced_text": text}


def last_prompt(sched, tok) -> str:
    return tok.decode(sched.submitted[-1][0])


def chat_stream(oai, **kwargs):
    """(reasoning, content, {index: (name, arguments)}, finish_reason, usage) of a stream."""
    reasoning, content, calls, finish, usage = "", "", {}, None, None
    for chunk in oai.chat.completions.create(model=MODEL, stream=True, **kwargs):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            d = choice.delta
            reasoning += getattr(d, "reasoning_content", None) or ""
            content += d.content or ""
            for tc in d.tool_calls or ():
                name, args = calls.get(tc.index, ("", ""))
                if tc.id:
                    assert tc.index not in calls and tc.function.name
                calls[tc.index] = (
                    name + (tc.function.name or ""),
                    args + (tc.function.arguments or ""),
                )
            finish = choice.finish_reason or finish
    return reasoning, content, calls, finish, usage


# ------------------------------------------------------------------ chat completions
@pytest.mark.parametrize("per_event", [1, 3, 50])
@pytest.mark.parametrize("script", [REASONED, "Plain answer.<|im_end|>", "Cut off in the mid"])
def test_chat_stream_equals_non_stream(oai, sched, script, per_event):
    sched.tokens_per_event = per_event
    kwargs = {"messages": USER, "tools": TOOLS, "extra_body": forced(script), "max_tokens": 40}
    full = oai.chat.completions.create(model=MODEL, **kwargs)
    message = full.choices[0].message
    reasoning, content, calls, finish, _ = chat_stream(oai, **kwargs)
    assert reasoning == (message.reasoning_content or "")
    assert content == (message.content or "")
    assert calls == {
        i: (c.function.name, c.function.arguments) for i, c in enumerate(message.tool_calls or ())
    }
    assert finish == full.choices[0].finish_reason


def test_chat_reasoning_and_tool_call(oai):
    r = oai.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, extra_body=forced(REASONED)
    )
    choice = r.choices[0]
    assert choice.message.reasoning_content == "I should look it up."
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert choice.finish_reason == "tool_calls"
    assert r.usage.completion_tokens_details.reasoning_tokens > 0


def test_tool_round_trip(oai, sched, tok):
    first = (
        oai.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, extra_body=forced(REASONED)
        )
        .choices[0]
        .message
    )
    history = [
        *USER,
        first.model_dump(exclude_none=True),  # arguments as a JSON string, as clients send
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny, 20C"},
    ]
    second = oai.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, extra_body=forced(THOUGHT_ANSWER)
    )
    assert second.choices[0].message.content == "Sunny, 20 degrees."
    assert second.choices[0].finish_reason == "stop"
    prompt = last_prompt(sched, tok)
    assert "<tool_response>\nsunny, 20C\n</tool_response>" in prompt
    assert "<parameter=city>\nParis\n</parameter>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")


def test_thinking_off_starts_in_content(oai, sched, tok):
    r = oai.chat.completions.create(
        model=MODEL,
        messages=USER,
        extra_body={
            **forced("Direct.<|im_end|>"),
            "chat_template_kwargs": {"enable_thinking": False},
        },
    )
    assert last_prompt(sched, tok).endswith("<think>\n\n</think>\n\n")
    assert r.choices[0].message.content == "Direct."
    assert r.choices[0].message.reasoning_content is None
    on = oai.chat.completions.create(
        model=MODEL, messages=USER, extra_body=forced("Direct.<|im_end|>")
    )
    assert on.choices[0].message.reasoning_content == "Direct."  # no </think>: all reasoning
    assert on.choices[0].message.content == ""


def test_preserve_thinking_and_developer_role(oai, sched, tok):
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
    ]
    oai.chat.completions.create(
        model=MODEL,
        messages=history,
        extra_body={**forced("x<|im_end|>"), "chat_template_kwargs": {"preserve_thinking": True}},
    )
    prompt = last_prompt(sched, tok)
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\nUse tools.<|im_end|>")
    assert "<think>\nr1\n</think>\n\na1" in prompt
    oai.chat.completions.create(model=MODEL, messages=history, extra_body=forced("x<|im_end|>"))
    assert "r1" not in last_prompt(sched, tok)


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_choice(oai, sched, tok, choice):
    rest = "<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call><|im_end|>"
    script = rest if isinstance(choice, dict) else "get_weather>\n" + rest
    r = oai.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice=choice, extra_body=forced(script)
    )
    assert last_prompt(sched, tok).endswith(
        "</think>\n\n<tool_call>\n<function="
        + ("get_weather>\n" if isinstance(choice, dict) else "")
    )
    (call,) = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Rome"},
    )


def test_tool_choice_none_keeps_xml_as_content(oai):
    r = oai.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice="none",
        extra_body=forced("a</think>" + CALL + "<|im_end|>"),
    )
    assert r.choices[0].message.content == CALL and not r.choices[0].message.tool_calls


def test_stop_string_cuts_and_frees_the_slot(oai, sched):
    script = "</think>one two three four five six<|im_end|>"
    r = oai.chat.completions.create(
        model=MODEL, messages=USER, stop=["three"], extra_body=forced(script)
    )
    assert r.choices[0].message.content == "one two"
    assert r.choices[0].finish_reason == "stop"
    _, content, _, finish, _ = chat_stream(
        oai, messages=USER, stop="three", extra_body=forced(script)
    )
    assert (content, finish) == ("one two", "stop")


def test_max_tokens_n_seed_logprobs_usage(oai, sched):
    r = oai.chat.completions.create(
        model=MODEL,
        messages=USER,
        n=2,
        max_completion_tokens=5,
        seed=7,
        logprobs=True,
        top_logprobs=2,
        extra_body=forced("</think>abcdefghij"),
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.finish_reason == "length" and len(c.logprobs.content) == 5
        assert len(c.logprobs.content[0].top_logprobs) == 2
    assert r.usage.completion_tokens == 10
    seeds = [p.seed for _, p, _ in sched.submitted[-2:]]
    assert seeds == [7, 8]
    *_, usage = chat_stream(
        oai,
        messages=USER,
        n=2,
        max_tokens=5,
        stream_options={"include_usage": True},
        extra_body=forced("</think>abcdefghij"),
    )
    assert usage.completion_tokens == 10 and usage.prompt_tokens == r.usage.prompt_tokens
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=5,
        logprobs=True,
        top_logprobs=1,
        stream=True,
        extra_body=forced("</think>abcdefghij"),
    )
    entries = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in entries] == ["</think>", "a", "b", "c", "d"]


def test_generation_config_defaults_and_overrides(oai, sched):
    oai.chat.completions.create(
        model=MODEL,
        messages=USER,
        temperature=0.3,
        top_p=0.5,
        extra_body={**forced("x<|im_end|>"), "top_k": 5},
    )
    params = sched.submitted[-1][1]
    assert (params.temperature, params.top_p, params.top_k) == (0.3, 0.5, 5)


# ------------------------------------------------------------------ completions
def test_completions(oai):
    r = oai.completions.create(
        model=MODEL,
        prompt=["ab", "cd"],
        max_tokens=4,
        n=2,
        logprobs=2,
        extra_body=forced("wxyz tail"),
    )
    assert [c.text for c in r.choices] == ["wxyz"] * 4 and r.usage.completion_tokens == 16
    assert r.choices[0].logprobs.tokens == list("wxyz")
    chunks = list(
        oai.completions.create(
            model=MODEL,
            prompt="ab",
            max_tokens=4,
            echo=True,
            stream=True,
            extra_body=forced("wxyz"),
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == "abwxyz"
    assert chunks[-1].choices[0].finish_reason == "length"


# ------------------------------------------------------------------ responses
def test_responses_function_call_round_trip(oai, sched, tok):
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "parameters": TOOLS[0]["function"]["parameters"],
        }
    ]
    r = oai.responses.create(
        model=MODEL,
        input="Weather in Paris?",
        tools=tools,
        instructions="Be brief.",
        extra_body=forced(REASONED),
    )
    kinds = [item.type for item in r.output]
    assert kinds == ["reasoning", "message", "function_call"]
    call = r.output[2]
    assert json.loads(call.arguments) == {"city": "Paris", "days": 3}
    follow = [
        {"role": "user", "content": "Weather in Paris?"},
        *[item.model_dump(exclude_none=True) for item in r.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    r2 = oai.responses.create(
        model=MODEL, input=follow, tools=tools, extra_body=forced(THOUGHT_ANSWER)
    )
    assert r2.output_text == "Sunny, 20 degrees." and r2.status == "completed"
    assert "<tool_response>\nsunny\n</tool_response>" in last_prompt(sched, tok)


def test_responses_stream_matches(oai):
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "parameters": TOOLS[0]["function"]["parameters"],
        }
    ]
    kwargs = {"model": MODEL, "input": "Weather?", "tools": tools, "extra_body": forced(REASONED)}
    full = oai.responses.create(**kwargs)
    with oai.responses.stream(**kwargs) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in types
    strip = lambda items: [
        {k: v for k, v in i.model_dump(exclude_none=True).items() if k not in ("id", "call_id")}
        for i in items
    ]
    assert strip(final.output) == strip(full.output)
    cut = oai.responses.create(
        model=MODEL, input="x", max_output_tokens=3, extra_body=forced("abcdef")
    )
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


# ------------------------------------------------------------------ anthropic
def test_messages_thinking_and_tool_use_round_trip(claude, sched, tok):
    tools = [{"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}]
    m = claude.messages.create(
        model="claude-test-model",
        max_tokens=200,
        system=[{"type": "text", "text": "Brief."}],
        messages=USER,
        tools=tools,
        thinking={"type": "enabled", "budget_tokens": 100},
        extra_body=forced(REASONED),
    )
    assert [b.type for b in m.content] == ["thinking", "text", "tool_use"]
    assert m.content[0].thinking == "I should look it up." and m.content[0].signature == ""
    assert m.content[2].input == {"city": "Paris", "days": 3}
    assert m.stop_reason == "tool_use" and m.model == "claude-test-model"
    history = [
        *USER,
        {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": m.content[2].id,
                    "content": [{"type": "text", "text": "sunny"}],
                    "cache_control": {"type": "ephemeral"},
                }
            ],
        },
    ]
    m2 = claude.messages.create(
        model="x", max_tokens=50, messages=history, tools=tools, extra_body=forced(ANSWER)
    )
    assert m2.content[0].text == "Sunny, 20 degrees." and m2.stop_reason == "end_turn"
    prompt = last_prompt(sched, tok)
    assert "<tool_response>\nsunny\n</tool_response>" in prompt
    assert prompt.endswith("<think>\n\n</think>\n\n")  # no thinking field: thinking off


@pytest.mark.parametrize("per_event", [1, 4])
def test_messages_stream_equals_non_stream(claude, sched, per_event):
    sched.tokens_per_event = per_event
    tools = [{"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}]
    kwargs = {
        "model": "x",
        "max_tokens": 200,
        "messages": USER,
        "tools": tools,
        "thinking": {"type": "enabled", "budget_tokens": 100},
        "extra_body": forced(REASONED),
    }
    full = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    drop = lambda m: [
        {k: v for k, v in b.model_dump().items() if k not in ("id", "parsed_output")}
        for b in m.content
    ]
    assert drop(final) == drop(full)
    assert (final.stop_reason, final.usage.output_tokens) == (
        full.stop_reason,
        full.usage.output_tokens,
    )


def test_messages_thinking_budget_forces_an_answer(claude, sched, tok):
    script = "a" * 30 + "<|im_end|>"
    m = claude.messages.create(
        model="x",
        max_tokens=100,
        messages=USER,
        thinking={"type": "enabled", "budget_tokens": 6},
        extra_body=forced(script),
    )
    # The engine forces </think> in place of output token 6; the script goes on after it.
    assert m.content[0].type == "thinking" and m.content[0].thinking == "a" * 6
    assert m.content[1].text == "a" * 23
    assert sched.submitted[-1][1].max_tokens == 100


def test_messages_stop_sequences_and_max_tokens(claude):
    m = claude.messages.create(
        model="x",
        max_tokens=50,
        messages=USER,
        stop_sequences=["STOP"],
        extra_body=forced("one STOP two<|im_end|>"),
    )
    assert (m.content[0].text, m.stop_reason, m.stop_sequence) == ("one", "stop_sequence", "STOP")
    m = claude.messages.create(model="x", max_tokens=3, messages=USER, extra_body=forced("abcdef"))
    assert (m.content[0].text, m.stop_reason) == ("abc", "max_tokens")


def test_count_tokens(claude, tok):
    n = claude.messages.count_tokens(model="x", messages=USER).input_tokens
    prompt = tok.apply_chat_template(USER, enable_thinking=False)
    assert n == len(tok.encode(prompt))


# ------------------------------------------------------------------ errors and operations
BAD_CHAT = [
    ({"model": "nope", "messages": USER}, 404, "model"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": MODEL, "messages": USER, "temperature": 3}, 400, "temperature"),
    ({"model": MODEL, "messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": MODEL, "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}, 400, "messages"),
    (
        {
            "model": MODEL,
            "messages": USER,
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
            ],
        },
        400,
        "tools[0].function.parameters",
    ),
    (
        {
            "model": MODEL,
            "messages": USER,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}},
        },
        400,
        "response_format.json_schema",
    ),
    (
        {
            "model": MODEL,
            "messages": USER,
            "response_format": {"type": "json_object"},
            "tools": TOOLS,
            "tool_choice": "required",
        },
        400,
        "response_format",
    ),
    (
        {"model": MODEL, "messages": USER, "response_format": {"type": "yaml"}},
        400,
        "response_format",
    ),
    ({"model": MODEL, "messages": USER, "frobnicate": 1}, 400, "frobnicate"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": USER, "n": "two"}, 400, "n"),
]


@pytest.mark.parametrize("body,status,param", BAD_CHAT, ids=[b[2] for b in BAD_CHAT])
def test_bad_chat_requests(server, oai, body, status, param):
    code, _, out = http(server.base, "POST", "/v1/chat/completions", body, key=KEY)
    assert code == status, out
    assert out["error"]["param"] == param and out["error"]["message"]
    assert out["error"]["type"] in ("invalid_request_error", "not_found_error")
    ok = oai.chat.completions.create(model=MODEL, messages=USER, extra_body=forced("x<|im_end|>"))
    assert ok.choices[0].message.reasoning_content == "x"


def test_malformed_json_and_unknown_route(server):
    code, _, out = http(server.base, "POST", "/v1/chat/completions", raw=b"{not json", key=KEY)
    assert code == 400 and "JSON" in out["error"]["message"]
    code, _, out = http(server.base, "POST", "/v1/messages", raw=b"[1]", key=KEY)
    assert code == 400 and out["type"] == "error"
    assert http(server.base, "GET", "/v1/nothing", key=KEY)[0] == 404


def test_previous_response_id_is_refused(oai):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        oai.responses.create(model=MODEL, input="x", previous_response_id="resp_1")


def test_bad_anthropic_requests(claude):
    with pytest.raises(anthropic.BadRequestError, match="role"):
        claude.messages.create(
            model="x", max_tokens=5, messages=[{"role": "system", "content": "x"}]
        )
    with pytest.raises(anthropic.BadRequestError, match="input_schema"):
        claude.messages.create(
            model="x",
            max_tokens=5,
            messages=USER,
            tools=[{"name": "f", "input_schema": {"type": "string"}}],
        )
    m = claude.messages.create(
        model="x", max_tokens=5, messages=USER, extra_body=forced("ok<|im_end|>")
    )
    assert m.content[0].text == "ok"


def test_auth(server):
    assert http(server.base, "GET", "/health")[0] == 200
    for path in ("/metrics", "/v1/models"):
        code, _, out = http(server.base, "GET", path)
        assert code == 401 and out["error"]["type"] == "authentication_error"
    code, _, out = http(server.base, "POST", "/v1/messages", {}, headers={"x-api-key": "wrong"})
    assert code == 401 and out["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base + "/v1", api_key="wrong").models.list()
    code, _, out = http(server.base, "GET", "/v1/models", headers={"x-api-key": KEY})
    assert code == 200 and out["data"][0]["id"] == MODEL


def test_queue_full(oai, claude, sched):
    slots, waiting = sched.slots, sched.max_waiting
    sched.slots = sched.max_waiting = 0
    try:
        with pytest.raises(openai.RateLimitError) as e:
            oai.chat.completions.create(model=MODEL, messages=USER)
        assert e.value.response.headers["retry-after"] == "1"
        with pytest.raises(anthropic.InternalServerError) as e:
            claude.messages.create(model="x", max_tokens=5, messages=USER)
        assert e.value.status_code == 529 and e.value.body["error"]["type"] == "overloaded_error"
    finally:
        sched.slots, sched.max_waiting = slots, waiting
    assert oai.chat.completions.create(model=MODEL, messages=USER).choices[0].message


def test_disconnect_cancels_and_metrics(server, oai, sched):
    sched.tokens_per_event = 1
    stream = oai.chat.completions.create(
        model=MODEL, messages=USER, stream=True, extra_body=forced("</think>" + "z" * 500)
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert len(sched.active) == 1
    stream.close()
    deadline = time.monotonic() + 5
    while sched.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not sched.active
    text = http(server.base, "GET", "/metrics", key=KEY)[2]
    assert metric(text, "qwenjax:http_requests_client_disconnected_total") >= 1
    for name in (
        "time_to_first_token_seconds_count",
        "inter_token_latency_seconds_count",
        "e2e_request_latency_seconds_count",
        "num_requests_running",
        "num_requests_waiting",
        "prompt_tokens_total",
        "generation_tokens_total",
    ):
        assert metric(text, "qwenjax:" + name) is not None, name
    assert metric(text, "qwenjax:num_requests_running") == 0
