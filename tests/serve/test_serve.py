"""`qwenjax serve` end to end: a real server process on a tiny random checkpoint, driven with the
official `openai` and `anthropic` SDKs through the real engine, template, parser and HTTP stack.

The tiny model's text is random, so the tests that need a tool call or a reasoning block script
the sampled tokens with the test hook (`--enable-test-hooks`, `qwenjax_forced_text`); the others
compare greedy output with offline `qwenjax.generate` on the same prompt ids. The server starts
once for the module; the last test stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import time

import anthropic
import numpy as np
import openai
import pytest

from qwenjax.checkpoint import load
from qwenjax.tokenizer import Tokenizer
from tests.serve.server_util import http, metric, offline, start_server, tiny_checkpoint

KEY = "sk-test"
SLOTS = 8
MAX_LENGTH = 1280
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALL = (
    "Checking.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
    "</parameter>\n</function>\n</tool_call><|im_end|>"
)
ANSWER = "Done.\n</think>\n\nIt is sunny.<|im_end|>"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve_ckpt") / "tiny-qwen")


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_dir(ckpt)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    flags = ["--slots", str(SLOTS), "--max-length", str(MAX_LENGTH), "--prefill-chunk", "16"]
    flags += ["--max-waiting", "64", "--shutdown-timeout", "20"]
    proc = start_server(ckpt, log_path, KEY, *flags)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.base, api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(ckpt):
    return load(ckpt)


def forced(text: str) -> dict:
    return {"qwenjax_forced_text": text}


def test_startup_warns_and_names_the_model(server, oai):
    assert [m.id for m in oai.models.list().data] == ["tiny-qwen"]  # the directory's name
    assert http(server.base, "GET", "/v1/models")[0] == 401


def test_concurrent_streams_match_offline_generate(server, model, tok):
    """32 streaming completions at once (8 slots: most wait, then join the running batch) with
    different prompt lengths and budgets; every greedy one equals offline generate."""
    rng = np.random.default_rng(0)
    prompts = [
        [int(t) for t in rng.integers(32, 127, size=int(n))] for n in rng.integers(3, 90, size=32)
    ]
    budgets = [int(b) for b in rng.integers(4, 13, size=32)]
    sampled = set(range(3, 32, 5))  # other parameters in the same batch

    async def one(client, i):
        kwargs = (
            {"temperature": 0.9, "seed": i, "top_k": 20} if i in sampled else {"temperature": 0.0}
        )
        extra = {k: kwargs.pop(k) for k in ("top_k",) if k in kwargs}
        stream = await client.completions.create(
            model="tiny-qwen",
            prompt=prompts[i],
            max_tokens=budgets[i],
            stream=True,
            extra_body=extra,
            **kwargs,
        )
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run():
        client = openai.AsyncOpenAI(
            base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=300
        )
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert all(finish in ("stop", "length") for _, finish in results)
    greedy = [i for i in range(32) if i not in sampled]
    expected = offline(model, tok, [prompts[i] for i in greedy], [budgets[i] for i in greedy])
    assert [results[i][0] for i in greedy] == expected


def test_chat_stream_equals_non_stream_on_model_output(oai):
    kwargs = {"model": "tiny-qwen", "messages": USER, "max_tokens": 24, "temperature": 0}
    full = oai.chat.completions.create(**kwargs).choices[0]
    reasoning, content = "", ""
    for chunk in oai.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert (reasoning, content) == (full.message.reasoning_content or "", full.message.content)


def test_tool_round_trip_and_thinking(server, oai, tok):
    first = oai.chat.completions.create(
        model="tiny-qwen", messages=USER, tools=TOOLS, max_tokens=200, extra_body=forced(CALL)
    )
    msg = first.choices[0].message
    assert msg.reasoning_content == "Checking." and first.choices[0].finish_reason == "tool_calls"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
    history = [
        *USER,
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "sunny"},
    ]
    chunks = list(
        oai.chat.completions.create(
            model="tiny-qwen",
            messages=history,
            tools=TOOLS,
            max_tokens=100,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=forced(ANSWER),
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "It is sunny." and chunks[-1].usage.completion_tokens == len(
        tok.encode(ANSWER)
    )
    # The template re-renders the first reply as it was generated: the second turn prefills
    # only what follows it (its last token, <|im_end|>, was sampled but never run).
    reused = first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == reused
    text = http(server.base, "GET", "/metrics", key=KEY)[2]
    assert metric(text, "qwenjax:prefix_cache_hits_total") >= reused
    assert metric(text, "qwenjax:prefix_cache_queries_total") > reused
    off = (
        oai.chat.completions.create(
            model="tiny-qwen",
            messages=USER,
            max_tokens=50,
            extra_body={
                **forced("Plain.<|im_end|>"),
                "chat_template_kwargs": {"enable_thinking": False},
            },
        )
        .choices[0]
        .message
    )
    assert (off.content, off.reasoning_content) == ("Plain.", None)


def test_chat_turns_reuse_the_history_before_the_last_reply(oai, tok):
    """With thinking on, the template drops the last reply's reasoning once the user speaks
    again, so the live row does not match; the snapshot taken at the generation prompt does:
    all of the first prompt but its generation header is reused."""
    messages = [{"role": "system", "content": "Be brief. " * 12}, *USER]
    first = oai.chat.completions.create(
        model="tiny-qwen", messages=messages, max_tokens=50, extra_body=forced(ANSWER)
    )
    reply = first.choices[0].message
    messages += [
        {
            "role": "assistant",
            "content": reply.content,
            "reasoning_content": reply.reasoning_content,
        },
        {"role": "user", "content": "And tomorrow?"},
    ]
    second = oai.chat.completions.create(
        model="tiny-qwen", messages=messages, max_tokens=50, extra_body=forced(ANSWER)
    )
    header = len(tok.encode("<|im_start|>assistant\n<think>\n"))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - header
    assert second.choices[0].message.content == "It is sunny."


def test_another_conversation_reuses_the_system_prompt_and_tools(oai, tok):
    """Users of one agent: a conversation's prompt shares only the system message (with the
    tools) with an earlier one, and reads all of it from the snapshot taken where it ends,
    also when the two arrive at once (the scheduler tests check the rows and the outputs)."""

    def ask(system: str, question: str):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        text = tok.apply_chat_template(messages, TOOLS)
        prefix = len(tok.encode(text[: text.index("<|im_start|>user")]))
        r = oai.chat.completions.create(
            model="tiny-qwen",
            messages=messages,
            tools=TOOLS,
            max_tokens=50,
            extra_body=forced(ANSWER),
        )
        assert r.usage.prompt_tokens > prefix + 3
        return r.usage.prompt_tokens_details.cached_tokens, prefix

    first, prefix = ask("You are a weather agent.", "Paris?")
    second = ask("You are a weather agent.", "And in Lyon, tomorrow morning?")
    assert (first, second) == (0, (prefix, prefix))
    # Two at once with another system prompt: whichever the server takes second copies it from
    # the first's slot before its own prefill starts.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda q: ask("You are a travel agent.", q), ("Rome?", "Oslo?")))
    prefix = both[0][1]
    assert sorted(cached for cached, _ in both) == [0, prefix]


def test_responses_routes(oai):
    r = oai.responses.create(
        model="tiny-qwen", input="Hi", max_output_tokens=100, extra_body=forced(ANSWER)
    )
    assert [i.type for i in r.output] == [
        "reasoning",
        "message",
    ] and r.output_text == "It is sunny."
    with oai.responses.stream(
        model="tiny-qwen", input="Hi", max_output_tokens=100, extra_body=forced(ANSWER)
    ) as stream:
        for _ in stream:
            pass
        assert stream.get_final_response().output_text == "It is sunny."


def test_anthropic_messages(claude, tok):
    tools = [{"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}]
    m = claude.messages.create(
        model="claude-x",
        max_tokens=200,
        messages=USER,
        tools=tools,
        thinking={"type": "enabled", "budget_tokens": 100},
        extra_body=forced(CALL),
    )
    assert [b.type for b in m.content] == ["thinking", "tool_use"] and m.stop_reason == "tool_use"
    with claude.messages.stream(
        model="claude-x",
        max_tokens=200,
        messages=USER,
        tools=tools,
        thinking={"type": "enabled", "budget_tokens": 100},
        extra_body=forced(CALL),
    ) as stream:
        final = stream.get_final_message()
    assert final.content[1].input == m.content[1].input == {"city": "Paris"}
    # The same prompt again: all of it before the generation prompt comes from the snapshot
    # the first request took there (the streamed total arrives in message_delta).
    total = m.usage.input_tokens + m.usage.cache_read_input_tokens
    header = len(tok.encode("<|im_start|>assistant\n<think>\n"))
    assert final.usage.cache_read_input_tokens == total - header
    assert final.usage.input_tokens == header
    # The budget: the engine forces </think> after 5 tokens of the scripted reasoning.
    b = claude.messages.create(
        model="claude-x",
        max_tokens=30,
        messages=USER,
        thinking={"type": "enabled", "budget_tokens": 5},
        extra_body=forced("abcdefghij<|im_end|>"),
    )
    assert b.content[0].thinking == "abcde" and b.content[1].text == "ghij"
    n = claude.messages.count_tokens(model="claude-x", messages=USER).input_tokens
    assert n > 10


def test_bad_input_then_success(server, oai, claude):
    long = [{"role": "user", "content": "x" * (MAX_LENGTH + 10)}]
    code, _, out = http(
        server.base,
        "POST",
        "/v1/chat/completions",
        {"model": "tiny-qwen", "messages": long},
        key=KEY,
    )
    assert (
        code == 400 and out["error"]["param"] == "messages" and "context" in out["error"]["message"]
    )
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4", messages=USER)
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(
            model="x", max_tokens=5, messages=USER, extra_body={"temperature": 5}
        )
    ok = oai.chat.completions.create(model="tiny-qwen", messages=USER, max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_cancel_frees_the_slot(server, oai):
    stream = oai.chat.completions.create(
        model="tiny-qwen", messages=USER, max_tokens=480, stream=True, extra_body=forced("z" * 480)
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    text = http(server.base, "GET", "/metrics", key=KEY)[2]
    assert metric(text, "qwenjax:num_slots_used") == 1
    stream.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = http(server.base, "GET", "/metrics", key=KEY)[2]
        if metric(text, "qwenjax:num_slots_used") == 0:
            break
        time.sleep(0.1)
    assert metric(text, "qwenjax:num_slots_used") == 0
    assert metric(text, "qwenjax:num_requests_running") == 0
    assert metric(text, "qwenjax:http_requests_client_disconnected_total") >= 1
    assert metric(text, "qwenjax:generation_tokens_total") < 480 + 32 * 12 + 400


def test_sigterm_finishes_running_streams(server, oai):
    """Last: SIGTERM while a stream runs; the stream completes and the process exits cleanly."""
    stream = oai.chat.completions.create(
        model="tiny-qwen", messages=USER, max_tokens=60, stream=True, extra_body=forced("y" * 60)
    )
    chunks = iter(stream)
    next(chunks)
    server.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    # uvicorn re-raises the signal it handled once shutdown is complete.
    assert server.wait(60) in (0, -signal.SIGTERM)
    log = server.log_path.read_text()
    assert "draining the scheduler" in log and "Application shutdown complete" in log
