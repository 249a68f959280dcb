"""Chat with images and videos: the rendered, pad-expanded prompt and its pixels against
transformers' `Qwen3VLProcessor` (ids equal, grids equal, pixel_values ≤ 1e-5), the video
placeholder format of transformers 5.24, and `qwenjax chat --image` / `qwenjax generate` with
image messages against `Engine.decode` on the same inputs.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import PIL.Image
import pytest
import transformers
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwenjax.chat import QWEN3_6_CHAT_TEMPLATE
from qwenjax.checkpoint import load
from qwenjax.cli import main
from qwenjax.inference.engine import Engine
from qwenjax.inference.sampling import SamplingParams
from qwenjax.inference.text import chat_inputs, chat_prompt
from qwenjax.tokenizer import Tokenizer
from qwenjax.vision.model import VisionInputs
from qwenjax.vision.processor import Processor
from tests.vision.conftest import CHAT_PREPROCESSOR

N = 6  # reply tokens


class ImageOnlyProcessor(transformers.Qwen3VLProcessor):
    """transformers' processor without its video half (its video processor needs torchvision,
    which does not import beside the CPU torch of the tests)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        pass


def hf_processor(directory: str) -> ImageOnlyProcessor:
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{directory}/tokenizer.json")
    images = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size=CHAT_PREPROCESSOR["size"],
        image_mean=[0.5] * 3,  # Qwen3.6's preprocessor_config (our defaults)
        image_std=[0.5] * 3,
    )
    return ImageOnlyProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=QWEN3_6_CHAT_TEMPLATE,
    )


def write_image(path, height: int, width: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return str(path)


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Odd sizes: one inside the budget, one over the max pixels, one under the min."""
    d = tmp_path_factory.mktemp("images")
    return [
        write_image(d / "a.png", 70, 123, 0),
        write_image(d / "b.png", 301, 45, 1),
        write_image(d / "c.png", 19, 37, 2),
    ]


def test_image_chat_equals_transformers_processor(chat_vlm, images):
    a, b, c = images
    turns = lambda first, second, third: [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [first, {"type": "text", "text": "What is it?"}, second]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, third]},
    ]
    hf_messages = turns(
        {"type": "image", "path": a}, {"type": "image", "url": b}, {"type": "image", "path": c}
    )
    openai_messages = turns(
        {"type": "image_url", "image_url": {"url": data_url(a)}},
        {"type": "image", "image": b},
        {"type": "image_url", "image_url": {"url": c}},
    )
    ref = hf_processor(chat_vlm).apply_chat_template(
        hf_messages, tokenize=True, return_dict=True, add_generation_prompt=True
    )
    ids, inputs = chat_inputs(
        Tokenizer.from_dir(chat_vlm), openai_messages, processor=Processor.from_dir(chat_vlm)
    )
    assert ids == list(ref["input_ids"][0])
    np.testing.assert_array_equal(inputs.image_grid_thw, ref["image_grid_thw"])
    np.testing.assert_allclose(inputs.pixel_values, ref["pixel_values"], rtol=0, atol=1e-5)
    assert inputs.pixel_values_videos is None
    # The three budgets were hit as intended: inside, at the max, at the min.
    pixels = [int(h * w) * 16 * 16 for _, h, w in ref["image_grid_thw"]]
    size = CHAT_PREPROCESSOR["size"]
    assert size["shortest_edge"] < pixels[0] <= size["longest_edge"]
    assert pixels[1] <= size["longest_edge"] < 301 * 45
    assert 19 * 37 < size["shortest_edge"] <= pixels[2]


def test_video_placeholder_format(chat_vlm, tmp_path):
    """5 frames kept as sampled at 2 fps: temporal patches (0,1), (2,3), (4,4) at 0.25 s,
    1.25 s and 2.0 s; transformers 5.24 replaces only the pad, inside the template's pair."""
    for i in range(5):
        write_image(tmp_path / f"frame{i:02d}.png", 50, 70, 10 + i)
    tokenizer = Tokenizer.from_dir(chat_vlm)
    content = [{"type": "video", "video": str(tmp_path)}, {"type": "text", "text": "hi"}]
    messages = [{"role": "user", "content": content}]
    ids, inputs = chat_inputs(
        tokenizer, messages, processor=Processor.from_dir(chat_vlm), enable_thinking=False
    )
    (t, h, w), = inputs.video_grid_thw.tolist()  # fmt: skip
    assert t == 3 and inputs.pixel_values_videos.shape == (t * h * w, 1536)
    frame = lambda s: f"<{s} seconds><|vision_start|>" + "<|video_pad|>" * (h * w // 4)
    video = "".join(frame(s) + "<|vision_end|>" for s in ("0.2", "1.2", "2.0"))
    expected = (
        f"<|im_start|>user\n<|vision_start|>{video}<|vision_end|>hi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert tokenizer.decode(ids) == expected
    with pytest.raises(ValueError, match="use chat_inputs"):
        chat_prompt(tokenizer, messages)


@pytest.fixture(scope="module")
def engine(chat_vlm):
    return Engine(load(chat_vlm, vision=True))


def oracle(engine, tokenizer, prompts: list[tuple[list[int], VisionInputs | None]]) -> list:
    """Greedy replies (text, ids) by `Engine.decode`, cut after the first stop id."""
    greedy = SamplingParams(temperature=0.0, stop_token_ids=tokenizer.eos_token_ids)
    gen = engine.decode(
        [ids for ids, _ in prompts],
        [greedy] * len(prompts),
        max_new_tokens=N,
        pad_id=tokenizer.pad_id,
        vision=VisionInputs.concat([v for _, v in prompts]),
    )
    out = []
    for b, reason in enumerate(gen.finish_reasons):
        ids = gen.tokens[b, : gen.lengths[b]].tolist()
        text = tokenizer.decode(ids[:-1] if reason == "stop" else ids, skip_special_tokens=True)
        out.append((text, ids))
    return out


def test_chat_cli_with_an_image(chat_vlm, engine, images, capsys, monkeypatch):
    """Two turns: the image stays in the first user turn of the re-rendered history."""
    tokenizer, processor = Tokenizer.from_dir(chat_vlm), Processor.from_dir(chat_vlm)
    render = lambda m: chat_inputs(tokenizer, m, processor=processor, enable_thinking=False)
    content = [{"type": "image", "image": images[0]}, {"type": "text", "text": "what?"}]
    first = [{"role": "user", "content": content}]
    r1 = oracle(engine, tokenizer, [render(first)])[0][0]
    history = [*first, {"role": "assistant", "content": r1.strip()}]
    r2 = oracle(engine, tokenizer, [render([*history, {"role": "user", "content": "and?"}])])[0][0]
    blind = oracle(engine, tokenizer, [render([{"role": "user", "content": "what?"}])])[0][0]
    assert r1 != blind  # the image changes the reply, so the check below sees it arrive

    monkeypatch.setattr("sys.stdin", io.StringIO("what?\nand?\n"))
    main(["chat", "--checkpoint", chat_vlm, "--image", images[0], "--no-thinking",
          "--temperature", "0", "--max-new-tokens", str(N)])  # fmt: skip
    assert capsys.readouterr().out == f"{r1.strip()}\n{r2.strip()}\n"


def test_generate_jsonl_with_images(chat_vlm, engine, images, tmp_path, capsys):
    """A batch of an image request and a text request through `qwenjax generate`."""
    tokenizer = Tokenizer.from_dir(chat_vlm)
    image = {"type": "image_url", "image_url": {"url": images[1]}}
    content = [image, {"type": "text", "text": "?"}]
    records = [
        {"messages": [{"role": "user", "content": content}]},
        {"messages": [{"role": "user", "content": "no image here"}]},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    main(["generate", "--checkpoint", chat_vlm, "--input", str(src), "--output", str(dst),
          "--temperature", "0", "--max-new-tokens", str(N), "--batch-size", "2"])  # fmt: skip
    got = [json.loads(line)["token_ids"] for line in dst.read_text().splitlines()]
    processor = Processor.from_dir(chat_vlm)
    prompts = [chat_inputs(tokenizer, r["messages"], processor=processor) for r in records]
    assert prompts[0][1] is not None and prompts[1][1] is None
    assert got == [ids for _, ids in oracle(engine, tokenizer, prompts)]
    capsys.readouterr()


def test_media_errors(chat_vlm, images, capsys):
    tokenizer = Tokenizer.from_dir(chat_vlm)
    user = lambda part: [{"role": "user", "content": [part]}]
    with pytest.raises(ValueError, match="not fetched"):
        chat_inputs(tokenizer, user({"type": "image_url", "image_url": {"url": "http://x/a.png"}}))
    with pytest.raises(ValueError, match="without a source"):
        chat_inputs(tokenizer, user({"type": "image"}))
    with pytest.raises(ValueError, match="not decoded"):
        chat_inputs(tokenizer, user({"type": "video", "video": images[0]}))
    with pytest.raises(SystemExit):
        main(["chat", "--checkpoint", chat_vlm, "--image", "/nonexistent.png"])
    assert "--image /nonexistent.png does not exist" in capsys.readouterr().err


def test_replaced_parts_keep_the_rest_of_the_message():
    from qwenjax.vision.processor import extract_media

    message = {"role": "user", "content": [{"type": "text", "text": "a"}], "name": "x"}
    video = {"type": "video_url", "video_url": {"url": "/frames"}, "fps": 4}
    out, media = extract_media([{**message, "content": [video]}])
    assert out == [{**message, "content": [{"type": "video"}]}]
    assert [(m.kind, m.source, m.fps) for m in media] == [("video", "/frames", 4.0)]
