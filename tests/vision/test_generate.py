"""Generation with images and videos against transformers' `Qwen3_5ForConditionalGeneration`.

Reference: transformers' full forward on the growing sequence (no cache: every step recomputes
`get_rope_index` over prompt + output, so the output's positions come from the same walk that
our decode reproduces with the cached rope delta), and transformers `generate`. Greedy tokens
must be identical; per-step fp32 log-probabilities (the whole vocabulary) within 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qwenjax
from qwenjax.checkpoint import load
from qwenjax.inference.engine import Engine
from qwenjax.inference.sampling import SamplingParams
from qwenjax.vision.model import VisionInputs
from tests.conftest import rel_err
from tests.vision.conftest import IMAGE, VIDEO, hf_logits, row

TOL = 1e-4
NEW_TOKENS = 7


@pytest.fixture(scope="module")
def model(hf_vlm):
    return load(hf_vlm[1], vision=True)


ROWS = {
    "two images": lambda p: p.text(5) + p.image(6, 4) + p.text(3) + p.image(2, 6) + p.text(2),
    "text only": lambda p: p.text(11),
    "video": lambda p: p.text(2) + p.video(3, 4, 6) + p.text(4),
}


@pytest.fixture(scope="module")
def prompts():
    return [row(20 + i, build) for i, build in enumerate(ROWS.values())]


def hf_greedy(hf, ids: list[int], vision: VisionInputs | None, n: int):
    """Greedy tokens and log-probabilities `[n, V]` by full forwards on the growing sequence."""
    seq, logprobs = list(ids), []
    inputs = {} if vision is None else vision.kwargs()
    for _ in range(n):
        logits = torch.from_numpy(hf_logits(hf, np.array([seq]), **inputs)[0, -1])
        logprobs.append(torch.log_softmax(logits, -1).numpy())
        seq.append(int(logits.argmax()))
    return seq[len(ids) :], np.stack(logprobs)


def full_logprobs(gen, vocab: int) -> np.ndarray:
    """`[B, N, V]` from top-logprobs of the whole vocabulary."""
    ids, lps = gen.top_logprobs
    out = np.full((*ids.shape[:2], vocab), np.nan)
    np.put_along_axis(out, ids, lps, axis=-1)
    return out


def test_batched_greedy_equals_transformers(hf_vlm, model, prompts):
    """Two images in a row, a text row and a video row, of different lengths in one batch."""
    hf, _ = hf_vlm
    vocab = model.config.vocab_size
    greedy = [SamplingParams(temperature=0.0)] * len(prompts)
    gen = Engine(model).decode(
        [ids for ids, _ in prompts],
        greedy,
        max_new_tokens=NEW_TOKENS,
        num_top_logprobs=vocab,
        vision=VisionInputs.concat([v for _, v in prompts]),
    )
    ours = full_logprobs(gen, vocab)
    for b, (name, (ids, vision)) in enumerate(zip(ROWS, prompts, strict=True)):
        tokens, ref = hf_greedy(hf, ids, vision, NEW_TOKENS)
        top2 = np.sort(ref, axis=-1)[:, -2:]
        err = rel_err(ours[b], ref)
        print(f"{name}: margin {np.min(top2[:, 1] - top2[:, 0]):.1e}, logprob rel err {err:.1e}")
        assert gen.tokens[b].tolist() == tokens, name
        assert err < TOL, (name, err)


def test_speculative_greedy_equals_plain(model, prompts):
    """The MTP drafter's positions carry the rope delta; greedy output is the trunk's."""
    rows, vision = [ids for ids, _ in prompts], VisionInputs.concat([v for _, v in prompts])
    engine, greedy = Engine(model), [SamplingParams(temperature=0.0)] * len(rows)
    plain = engine.decode(rows, greedy, max_new_tokens=NEW_TOKENS, vision=vision)
    spec = engine.decode(
        rows, greedy, max_new_tokens=NEW_TOKENS, vision=vision, num_speculative_tokens=2
    )
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    assert spec.drafted > 0


@pytest.mark.parametrize("name", ["two images", "video"])
def test_generate_equals_transformers_generate(hf_vlm, model, prompts, name):
    """`qwenjax.generate` with the processor's argument names, against HF `generate`."""
    hf, _ = hf_vlm
    ids, vision = prompts[list(ROWS).index(name)]
    kinds = np.where(np.array(ids) == IMAGE, 1, np.where(np.array(ids) == VIDEO, 2, 0))
    inputs = {k: torch.from_numpy(v) for k, v in vision.kwargs().items() if v is not None}
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor([ids]),
            mm_token_type_ids=torch.from_numpy(kinds[None]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            **inputs,
        )
    got = qwenjax.generate(model, [ids], NEW_TOKENS, **vision.kwargs())
    assert got[0].tolist() == out[0, len(ids) :].tolist()


def test_vision_inputs_are_checked(hf_vlm, model, prompts):
    ids, vision = prompts[0]
    first = int(vision.image_grid_thw[0].prod())
    one_image = VisionInputs(vision.pixel_values[:first], vision.image_grid_thw[:1])
    with pytest.raises(ValueError, match="2 image runs"):
        Engine(model).start([ids], [SamplingParams()], max_new_tokens=2, vision=one_image)
    with pytest.raises(ValueError, match="vision tower"):
        Engine(load(hf_vlm[1])).start([ids], [SamplingParams()], max_new_tokens=2, vision=vision)
