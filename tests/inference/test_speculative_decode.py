"""MTP speculative decoding: its cache against a full MTP pass, greedy equal to plain greedy
(also with an oracle drafter whose planted mistakes make every acceptance count happen), and
speculative sampling keeping the target distribution.

Tolerances: fp32 MTP hidden states within 1e-4 relative of a full pass; tokens identical;
distributions within 4.5 standard errors per cell. (Split from test_decode.py so that the two
halves run on both test workers.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.api import build
from qwenjax.checkpoint import load
from qwenjax.config import ModelConfig
from qwenjax.inference import engine as engine_mod
from qwenjax.inference.engine import Engine, generate
from qwenjax.inference.sampling import SamplingParams
from qwenjax.model.cache import init_cache
from tests.conftest import rel_err
from tests.inference.test_decode import TOL, prompts_of
from tests.kernels.gdn_cases import force_in_stack


@pytest.fixture(scope="module")
def text_model(hf_checkpoint):
    hf, path = hf_checkpoint("text")
    return hf, path, load(path, dtype=jnp.float32)


def test_mtp_cache_matches_a_full_mtp_pass(text_model):
    _, _, model = text_model
    rows = jnp.asarray(prompts_of([24, 24], model.config.vocab_size, seed=8), jnp.int32)
    hidden = model.hidden(rows)
    nxt = jnp.roll(rows, -1, axis=1)
    full = model.mtp_hidden(hidden, nxt)
    cache = init_cache(model.config, 2, 32, jnp.float32, mtp=True).mtp
    first, cache = model.mtp_extend(hidden[:, :15], nxt[:, :15], cache, jnp.zeros(2, jnp.int32))
    parts = [first]
    for t in range(15, 24):  # then one index at a time, like recursive drafting
        h, cache = model.mtp_extend(hidden[:, t : t + 1], nxt[:, t : t + 1], cache, jnp.full(2, t))
        parts.append(h)
    assert rel_err(jnp.concatenate(parts, 1), full) < TOL


def test_speculative_greedy_equals_plain_greedy(text_model):
    _, _, model = text_model
    prompts = prompts_of([13, 40, 4], model.config.vocab_size, seed=22)
    plain = generate(model, prompts, 20)
    # k=1 here; k=2 runs in the mesh test and k=3 in the oracle-drafter test below.
    spec = generate(model, prompts, 20, speculative="mtp", num_speculative_tokens=1)
    np.testing.assert_array_equal(spec, plain)


@pytest.mark.parametrize("in_stack", [False, True])
def test_speculative_rollback_with_partly_right_drafts(text_model, monkeypatch, in_stack):
    """Drafts from an oracle (the plain greedy output) with planted mistakes: every acceptance
    count from 0 to k happens, and the output still equals plain greedy decoding. `in_stack`:
    the GDN decode in its TPU/GPU form (verification only reads the states, `commit` advances
    them in closed form), on CPU too, against plain greedy decoding in the CPU form."""
    _, _, model = text_model
    prompts = prompts_of([13, 40, 4, 25], model.config.vocab_size, seed=23)
    n, k = 18, 3
    plain = jnp.asarray(generate(model, prompts, n + k + 2))
    traced = force_in_stack(monkeypatch) if in_stack else []
    real_draft = engine_mod._draft
    seen = []

    def oracle_draft(model, s, req, k):
        drafts, q, mtp = real_draft(model, s, req, k)
        b = drafts.shape[0]
        idx = s.num_out[:, None] + jnp.arange(k)[None, :]  # output index of draft j
        truth = jnp.take_along_axis(plain, idx, axis=1)
        # Row b errs at draft position (b + step) % (k + 1); position k means "no mistake".
        wrong_at = (jnp.arange(b) + s.steps) % (k + 1)
        truth = jnp.where(jnp.arange(k)[None, :] == wrong_at[:, None], (truth + 1) % 331, truth)
        seen.append(None)
        return truth.astype(jnp.int32), q, mtp

    jax.clear_caches()
    monkeypatch.setattr(engine_mod, "_draft", oracle_draft)
    out = Engine(model).decode(
        prompts,
        [SamplingParams(temperature=0.0)] * 4,
        max_new_tokens=n,
        num_speculative_tokens=k,
    )
    jax.clear_caches()
    assert seen, "the oracle drafter was not traced"
    assert bool(traced) == in_stack
    np.testing.assert_array_equal(out.tokens, np.asarray(plain)[:, :n])
    # Mistakes at positions 0..k in turn: mean accepted = (0 + 1 + 2 + 3) / 4 per 3 drafted.
    assert 0.3 < out.acceptance_rate < 0.7, out.acceptance_rate


def small_vocab_model(vocab: int = 8, seed: int = 0):
    """A tiny model with a small vocabulary and peaked distributions (logits scaled up)."""
    config = dataclasses.replace(ModelConfig.from_preset("tiny"), vocab_size=vocab)
    model = build(config, dtype=jnp.float32, seed=seed)
    model.lm_head[...] = model.lm_head[...] * 40.0
    model.embed_tokens[...] = model.embed_tokens[...] * 40.0
    return model


def exact_pair_distribution(model, prompt, temperature):
    """p(t1, t2 | prompt) from one batched full forward over every continuation t1."""
    v = model.config.vocab_size
    seqs = jnp.asarray([[*prompt, t1] for t1 in range(v)])  # [V, T + 1]
    logits = np.asarray(jax.jit(lambda x: model(x))(seqs), np.float64) / temperature
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p[0, -2][:, None] * p[:, -1]  # p(t1) · p(t2 | t1)


def test_sampled_pairs_follow_the_target_distribution():
    """Speculative sampling (k=2) keeps the target distribution of the first two tokens (plain
    sampling's distribution is tested row by row in test_sampling.py)."""
    k = 2
    model = small_vocab_model()
    v, rows, temperature = model.config.vocab_size, 3000, 1.0
    prompt = [3, 1, 4, 1, 5, 2, 6]
    expected = exact_pair_distribution(model, prompt, temperature)
    assert expected.max() > 3 / v**2  # not uniform: the test can tell distributions apart
    out = Engine(model).decode(
        [prompt] * rows,
        [SamplingParams(temperature=temperature)] * rows,
        max_new_tokens=2,
        num_speculative_tokens=k,
        default_seed=1234,
    )
    counts = np.zeros((v, v))
    np.add.at(counts, (out.tokens[:, 0], out.tokens[:, 1]), 1)
    freq = counts / rows
    sigma = np.sqrt(expected * (1 - expected) / rows) + 1e-4
    worst = np.max(np.abs(freq - expected) / sigma)
    assert worst < 4.5, (worst, out.acceptance_rate)
    assert out.drafted > 0 and 0.0 < out.acceptance_rate < 1.0
