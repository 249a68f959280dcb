"""Constrained decoding (`response_format`, Responses `text.format`) end to end: a real
`qwenjax serve` process (MTP speculation on) on the tiny random checkpoint, driven with the
official `openai` SDK.

The model's text is random, so a reply that parses and fits the schema is the grammar's doing.
A constrained request shares the batch with unconstrained ones, whose greedy output must still
equal offline `qwenjax.generate` (speculation pauses while the constrained row runs).
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import openai
import pytest

from qwenjax.checkpoint import load
from qwenjax.tokenizer import Tokenizer
from tests.serve.server_util import offline, start_server, tiny_checkpoint

KEY = "sk-test"
MODEL = "tiny-qwen"
USER = [{"role": "user", "content": "The weather in Paris for the next days, as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def check_weather(text: str) -> dict:
    """`text` is one JSON value valid under SCHEMA (checked by hand: no jsonschema here)."""
    value = json.loads(text)
    assert isinstance(value, dict) and set(value) == {"city", "days", "unit"}, value
    assert isinstance(value["city"], str) and len(value["city"]) <= 12, value
    assert type(value["days"]) is int and 1 <= value["days"] <= 14, value
    assert value["unit"] in ("celsius", "fahrenheit"), value
    return value


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("constrained_ckpt") / MODEL)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("constrained_log") / "server.log"
    flags = ["--slots", "4", "--max-length", "1024", "--prefill-chunk", "16"]
    proc = start_server(ckpt, log_path, KEY, *flags, "--speculative-tokens", "2")
    yield proc
    proc.kill()
    proc.wait(10)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=300)


def chat(oai, **kwargs):
    return oai.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=600, extra_body=NO_THINKING, **kwargs
    )


def test_json_schema_stream_equals_non_stream(oai):
    full = chat(oai, response_format=WEATHER, temperature=0).choices[0]
    assert full.finish_reason == "stop" and full.message.reasoning_content is None
    check_weather(full.message.content)
    stream = chat(oai, response_format=WEATHER, temperature=0, stream=True)
    content = "".join(c.choices[0].delta.content or "" for c in stream)
    assert content == full.message.content


def test_json_object(oai):
    for seed in range(3):
        r = chat(oai, response_format={"type": "json_object"}, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_constrained_beside_unconstrained_requests(server, ckpt):
    """One sampled constrained stream and greedy completions at once: the constrained reply
    fits the schema, the others equal offline generate."""
    model, tok = load(ckpt), Tokenizer.from_dir(ckpt)
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(32, 127, size=n)] for n in (7, 30, 50)]
    client = openai.AsyncOpenAI(
        base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=300
    )

    async def constrained() -> str:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=600,
            response_format=WEATHER,
            temperature=0.8,
            seed=7,
            stream=True,
            extra_body=NO_THINKING,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def free(prompt: list[int]) -> str:
        r = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=40, temperature=0
        )
        return r.choices[0].text

    async def run():
        return await asyncio.gather(constrained(), *(free(p) for p in prompts))

    content, *texts = asyncio.run(run())
    check_weather(content)
    assert texts == offline(model, tok, prompts, [40] * len(prompts))


def test_responses_text_format(oai):
    fmt = {"type": "json_schema", "name": "weather", "schema": SCHEMA, "strict": True}
    r = oai.responses.create(
        model=MODEL,
        input=USER[0]["content"],
        max_output_tokens=600,
        temperature=0,
        text={"format": fmt},
        extra_body=NO_THINKING,
    )
    assert r.status == "completed" and r.text.format.type == "json_schema"
    check_weather(r.output_text)


def test_thinking_on_constrains_the_answer_only(oai):
    """With thinking on the reasoning is free (scripted here by the test hook up to `</think>`)
    and the grammar starts after it."""
    r = oai.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=600,
        temperature=0,
        response_format=WEATHER,
        extra_body={"qwenjax_forced_text": "Sunny, I guess.\n</think>"},
    )
    message = r.choices[0].message
    assert message.reasoning_content == "Sunny, I guess."
    check_weather(message.content)


@pytest.mark.parametrize(
    "schema,match",
    [({"type": "nonsense"}, "Invalid type"), ({"$ref": "#/nowhere"}, "nowhere")],
)
def test_bad_schema_is_a_400(oai, schema, match):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(openai.BadRequestError, match=match) as e:
        chat(oai, response_format=bad)
    assert e.value.response.json()["error"]["param"] == "response_format.json_schema"
    with pytest.raises(openai.BadRequestError, match=match) as e:
        oai.responses.create(
            model=MODEL, input="x", text={"format": {"type": "json_schema", "schema": schema}}
        )
    assert e.value.response.json()["error"]["param"] == "text.format"
    with pytest.raises(openai.BadRequestError) as e:
        chat(oai, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert e.value.response.json()["error"]["param"] == "response_format.json_schema.schema"
