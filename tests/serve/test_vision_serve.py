"""Images over `qwenjax serve`: a real server process on a tiny random VLM checkpoint (vision
tower found in the checkpoint, processor config beside it), driven with the official `openai` and
`anthropic` SDKs, against offline `Engine.decode` on `chat_inputs` of the same conversation.

The image is an odd-sized (70×123) random PNG sent inline (a base64 data: URL / an Anthropic
base64 source) after the question. The server runs with `--max-pixels 6144` (the checkpoint's
budget would give the image 8 tokens, the cap 3, in prompt slots 30-32), so the prefill chunks
of 16 tokens split them, and with `--max-images 2`. Greedy replies (their text and token count)
must equal the offline ones on every route, streamed or not, and the prompt token count includes
the image's tokens. Bad images (and one image too many) are a 400 naming the field, after which
the server still answers image requests; a text-only model refuses images (over a scheduler
double: no model needed). MTP speculation with images is tested at the scheduler level
(test_vision_scheduler.py).
"""

from __future__ import annotations

import base64
import io

import anthropic
import numpy as np
import openai
import PIL.Image
import pytest

from qwenjax.checkpoint import load
from qwenjax.inference.engine import Engine
from qwenjax.inference.text import chat_inputs
from qwenjax.serve.app import build_app
from qwenjax.serve.common import ServerState
from qwenjax.testing.tiny_data import load_tiny_tokenizer
from qwenjax.tokenizer import Tokenizer
from qwenjax.vision.processor import Processor
from tests.serve.fake_scheduler import FakeScheduler
from tests.serve.server_util import ThreadServer, http, serving
from tests.vision.conftest import write_chat_vlm
from tests.vision.test_chat_inputs import N, oracle

KEY = "sk-vision"
SDK = {"api_key": KEY, "max_retries": 0, "timeout": 300}
MODEL = "tiny-vlm"
QUESTION = "What is in the picture?"
MAX_PIXELS, MAX_IMAGES = 6144, 2


def png(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    out = io.BytesIO()
    PIL.Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


B64 = base64.b64encode(png(70, 123, 0)).decode()
URL = "data:image/png;base64," + B64
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"not a png").decode()


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}


def anthropic_image(source: dict) -> dict:
    return {"type": "image", "source": source}


def input_image(url: str) -> dict:
    """A Responses `input` of one user message holding one image."""
    return {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": url}]}]}


BASE64 = {"type": "base64", "media_type": "image/png"}
CHAT, RESPONSES, MESSAGES = "/v1/chat/completions", "/v1/responses", "/v1/messages"
TEXT = {"type": "text", "text": QUESTION}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_chat_vlm(tmp_path_factory.mktemp("vlm_serve") / MODEL)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """Prefill chunks of 16 tokens; one process for the module."""
    log = tmp_path_factory.mktemp("vlm_serve_log") / "server.log"
    flags = "--slots", "2", "--max-length", "256", "--prefill-chunk", "16"
    flags += "--max-pixels", str(MAX_PIXELS), "--max-images", str(MAX_IMAGES)
    with serving(ckpt, log, KEY, *flags) as proc:
        yield proc


@pytest.fixture(scope="module")
def expected(ckpt):
    """(reply text, its token count, prompt tokens) of the image question, offline, with the
    server's pixel cap; the cap must change the prompt (3 image tokens instead of 8)."""
    tok = Tokenizer.from_dir(ckpt)
    messages = user(TEXT, image_url(URL))
    capped = Processor.from_dir(ckpt, max_pixels=MAX_PIXELS)
    prompt = chat_inputs(tok, messages, processor=capped, enable_thinking=False)
    uncapped = chat_inputs(tok, messages, processor=Processor.from_dir(ckpt), enable_thinking=False)
    assert len(uncapped[0]) - len(prompt[0]) == 8 - 3
    ((text, ids),) = oracle(Engine(load(ckpt, vision=True)), tok, [prompt])
    return text, len(ids), len(prompt[0])


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.base + "/v1", **SDK)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.base, **SDK)


def test_openai_chat_with_an_image_equals_offline(oai, expected):
    text, count, prompt = expected
    kwargs = dict(
        model=MODEL,
        messages=user(TEXT, image_url(URL)),
        max_tokens=N,
        temperature=0,
        extra_body=NO_THINKING,
    )
    r = oai.chat.completions.create(**kwargs)
    assert r.choices[0].message.content == text
    assert (r.usage.completion_tokens, r.usage.prompt_tokens) == (count, prompt)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in oai.chat.completions.create(stream=True, **kwargs)
        if c.choices
    )
    assert streamed == text
    # The Responses API's `input_image` (its image_url is the URL itself).
    content = [
        {**TEXT, "type": "input_text"},
        {"type": "input_image", "image_url": URL, "detail": "auto"},
    ]
    r = oai.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": content}],
        max_output_tokens=N,
        temperature=0,
        extra_body=NO_THINKING,
    )
    assert r.output_text == text and r.usage.input_tokens == prompt


def test_anthropic_image_block_equals_offline(claude, expected):
    text, count, prompt = expected
    image = anthropic_image({**BASE64, "data": B64})
    # This SDK version has no `temperature` argument: greedy goes in the body.
    kwargs = dict(
        model="claude-x", max_tokens=N, messages=user(TEXT, image), extra_body={"temperature": 0}
    )
    m = claude.messages.create(**kwargs)
    assert m.content[0].text == text
    assert (m.usage.output_tokens, m.usage.input_tokens) == (count, prompt)
    with claude.messages.stream(**kwargs) as stream:
        assert stream.get_final_text() == text
    assert (
        claude.messages.count_tokens(model="claude-x", messages=kwargs["messages"]).input_tokens
        == prompt
    )


BAD = [  # (route, body, param, a phrase of the message)
    (
        CHAT,
        {"messages": user(image_url("https://example.com/cat.png"), TEXT)},
        "messages[0].content[0].image_url",
        "remote fetching is disabled",
    ),
    (
        CHAT,
        {"messages": user(TEXT, image_url("data:image/png;base64,!!not*base64"))},
        "messages[0].content[1].image_url",
        "not a decodable image",
    ),
    (
        CHAT,
        {"messages": user(image_url(NOT_AN_IMAGE))},
        "messages[0].content[0].image_url",
        "not a decodable image",
    ),
    (
        CHAT,
        {"messages": user(image_url("/etc/hosts"))},
        "messages[0].content[0].image_url",
        "data:",
    ),
    (
        CHAT,
        {"messages": [{"role": "system", "content": [image_url(URL)]}, *user(TEXT)]},
        "messages[0].content[0]",
        "user messages only",
    ),
    (
        CHAT,
        {"messages": user({"type": "video_url", "video_url": {"url": URL}})},
        "messages[0].content[0]",
        "decodes no video",
    ),
    (
        RESPONSES,
        input_image("http://example.com/a.png"),
        "input[0].content[0].image_url",
        "remote fetching is disabled",
    ),
    (
        MESSAGES,
        {"messages": user(anthropic_image({"type": "url", "url": URL})), "max_tokens": 4},
        "messages[0].content[0].source",
        "remote fetching is disabled",
    ),
    (
        MESSAGES,
        {"messages": user(anthropic_image({**BASE64, "data": "AAAA"})), "max_tokens": 4},
        "messages[0].content[0].source.data",
        "not a decodable image",
    ),
    (
        CHAT,
        {"messages": user(TEXT, *[image_url(URL)] * (MAX_IMAGES + 1))},
        "messages",
        f"at most {MAX_IMAGES} per request",
    ),
]


def error_of(route: str, out: dict) -> tuple[str, str]:
    """(param, message) of an error in either API's envelope (Anthropic: "param: message")."""
    if route == MESSAGES:
        param, _, message = out["error"]["message"].partition(": ")
        return param, message
    return out["error"]["param"], out["error"]["message"]


@pytest.mark.parametrize("route,body,param,phrase", BAD, ids=[f"{b[0]} {b[2]}" for b in BAD])
def test_bad_images_are_a_400_naming_the_field(server, oai, expected, route, body, param, phrase):
    code, _, out = http(server.base, "POST", route, {"model": MODEL, **body}, key=KEY)
    assert code == 400, out
    got_param, message = error_of(route, out)
    assert got_param == param and phrase in message, out
    r = oai.chat.completions.create(
        model=MODEL,
        messages=user(TEXT, image_url(URL)),
        max_tokens=N,
        temperature=0,
        extra_body=NO_THINKING,
    )
    assert r.choices[0].message.content == expected[0]


def test_a_text_only_model_refuses_images(tmp_path):
    tok = load_tiny_tokenizer(tmp_path)
    state = ServerState(
        scheduler=FakeScheduler(tok.encode("Hi!<|im_end|>"), stop_token_ids=tok.eos_token_ids),
        tokenizer=tok,
        model_name=MODEL,
        max_length=512,
        vocab_size=512,
        api_key=KEY,
    )
    requests = [
        (CHAT, {"messages": user(TEXT, image_url(URL))}, "messages[0].content[1]"),
        (RESPONSES, input_image(URL), "input[0].content[0]"),
        (
            MESSAGES,
            {"messages": user(anthropic_image({**BASE64, "data": B64})), "max_tokens": 4},
            "messages[0].content[0]",
        ),
    ]
    with ThreadServer(build_app(state)) as srv:
        for route, body, param in requests:
            code, _, out = http(srv.base, "POST", route, {"model": MODEL, **body}, key=KEY)
            assert code == 400, out
            got_param, message = error_of(route, out)
            assert got_param == param and "text-only" in message, out
        client = openai.OpenAI(base_url=srv.base + "/v1", **SDK)
        r = client.chat.completions.create(model=MODEL, messages=user(TEXT), extra_body=NO_THINKING)
        assert r.choices[0].message.content == "Hi!"
