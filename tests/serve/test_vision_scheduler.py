"""The serving scheduler with images and videos, against offline `Engine.decode` (itself tested
against transformers in tests/vision/test_generate.py).

A tiny random VLM (odd-sized vision tower, random patches) behind a scheduler with fewer slots
than requests, 16-token prefill chunks and MTP speculation: image, video and text requests share
the batch and take each other's slots, chunk boundaries fall inside images and a video, and every
greedy output must equal offline generation. A second round of new image sizes and prompt
lengths in the same buckets compiles nothing new.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from qwenjax import sharding
from qwenjax.checkpoint import load
from qwenjax.inference.engine import Engine, _decode
from qwenjax.inference.sampling import SamplingParams
from qwenjax.serve import scheduler as sched
from qwenjax.serve import vision_prompt
from qwenjax.serve.scheduler import Scheduler
from qwenjax.vision.model import VisionInputs
from tests.hf_models import save_hf_checkpoint
from tests.vision.conftest import make_vlm, row

N = 8  # reply tokens
CHUNK = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlm_scheduler")
    save_hf_checkpoint(make_vlm(seed=2), path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    model = load(ckpt, vision=None)  # None: the vision tower, since the checkpoint has one
    assert hasattr(model, "visual") and model.mtp is not None
    return model


# Chunks are [0, 16), [16, 32), ...: the first image's pads fill slots 13-18 and the video's
# temporal patches slots 3-24, so prefill chunks split them.
FIRST = {
    "two images": lambda p: p.text(12) + p.image(4, 6) + p.text(5) + p.image(2, 6) + p.text(6),
    "text": lambda p: p.text(21),
    "video": lambda p: p.text(2) + p.video(2, 4, 6) + p.text(12),
    "short text": lambda p: p.text(9),
}
# Other image sizes, prompt lengths and video length, in the same patch bucket (≤ 64 patches)
# and prompt width (64).
SECOND = {
    "image": lambda p: p.text(20) + p.image(4, 4) + p.text(10),
    "video": lambda p: p.text(9) + p.video(3, 4, 4) + p.text(5),
}


def offline(model, requests) -> list[list[int]]:
    greedy = [SamplingParams(temperature=0.0)] * len(requests)
    gen = Engine(model).decode(
        [ids for ids, _ in requests],
        greedy,
        max_new_tokens=N,
        vision=VisionInputs.concat([v for _, v in requests]),
    )
    return gen.tokens.tolist()


def run(scheduler, requests) -> list[list[int]]:
    greedy = SamplingParams(temperature=0.0, max_tokens=N)
    handles = [scheduler.submit(ids, greedy, vision=v) for ids, v in requests]
    return [[t for event in h for t in event.token_ids] for h in handles]


def compiled() -> dict[str, int]:
    functions = {
        "prefill chunk": sched._prefill_chunk,
        "decode": _decode,
        "tower": vision_prompt._tower,
        "embed": vision_prompt._embed,
        "window": vision_prompt._window,
    }
    return {name: f._cache_size() for name, f in functions.items()}


def test_vision_requests_share_the_batch_and_equal_offline(model):
    first = [row(10 + i, build) for i, build in enumerate(FIRST.values())]
    second = [row(20 + i, build) for i, build in enumerate(SECOND.values())]
    scheduler = Scheduler(
        model, slots=2, max_length=128, prefill_chunk=CHUNK, num_speculative_tokens=2
    )
    want = offline(model, first + second)
    scheduler.start()
    try:
        for name, tokens, expected in zip(FIRST, run(scheduler, first), want[:4], strict=True):
            assert tokens == expected, name
        assert scheduler.stats()["spec_decode_num_draft_tokens_total"] > 0
        warm = compiled()
        got = run(scheduler, second)
        for name, tokens, expected in zip(SECOND, got, want[len(first) :], strict=True):
            assert tokens == expected, name
        assert compiled() == warm
        # Both slots last held vision rows (rope deltas -2 and -6); text rows reuse them and get
        # delta 0 again. (Their tokens cannot show a stale delta: it would shift every position
        # of the row alike, which rotary attention does not see.)
        deltas = lambda: sorted(np.asarray(scheduler._state.cache.rope_delta).tolist())
        assert deltas() == [-6, -2]
        assert run(scheduler, [first[1], first[3]]) == [want[1], want[3]]
        assert deltas() == [0, 0]
        assert scheduler.healthy
    finally:
        scheduler.stop()


def test_bad_vision_requests_are_refused(ckpt, model):
    ids, vision = row(30, lambda p: p.text(3) + p.image(2, 4) + p.text(2))
    greedy = SamplingParams(temperature=0.0, max_tokens=2)
    scheduler = Scheduler(model, slots=1, max_length=64, prefill_chunk=CHUNK)
    with pytest.raises(ValueError, match="1 image runs of lengths \\[1\\]"):
        scheduler.submit([t for i, t in enumerate(ids) if i != 5], greedy, vision=vision)
    text_only = Scheduler(load(ckpt), slots=1, max_length=64, prefill_chunk=CHUNK)
    with pytest.raises(ValueError, match="vision tower"):
        text_only.submit(ids, greedy, vision=vision)


def test_vision_requests_on_a_mesh_equal_offline(ckpt, model):
    """The same requests on 8 CPU devices as fsdp 8 (the tower's and the language model's
    weights and the 8 slots sharded; MTP on; this VLM's odd head counts rule out a tensor axis):
    every greedy output equals offline generation on one device. Slots that the batch split
    does not divide are refused up front (they used to kill the engine at the first step)."""
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=8))
    rules = sharding.RULES["fsdp"]
    sharded = load(ckpt, mesh=mesh, rules=rules, vision=None)
    tower = jax.tree.leaves(nnx.state(sharded.visual))
    assert tower and all(len(x.sharding.device_set) == 8 for x in tower)
    requests = [row(10 + i, build) for i, build in enumerate(FIRST.values())]
    want = offline(model, requests)
    with pytest.raises(ValueError, match=r"slots \(4\) must be a multiple of 8"):
        Scheduler(sharded, slots=4, max_length=128, mesh=mesh, rules=rules)
    scheduler = Scheduler(
        sharded,
        slots=8,
        max_length=128,
        prefill_chunk=CHUNK,
        num_speculative_tokens=2,
        mesh=mesh,
        rules=rules,
    )
    scheduler.start()
    try:
        for name, tokens, expected in zip(FIRST, run(scheduler, requests), want, strict=True):
            assert tokens == expected, name
        assert scheduler.healthy
    finally:
        scheduler.stop()
