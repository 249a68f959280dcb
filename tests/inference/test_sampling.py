"""Sampling math vs hand-computed expectations.

Every expected number or token set below is written out by hand (or, for the statistical tests,
by a two-line NumPy formula that restates the definition). The statistical tests use fixed seeds,
so they are deterministic; their bound is 4.5 standard deviations of a frequency,
4.5 · sqrt(p (1 − p) / N), per cell, and tokens a filter drops must never be drawn at all.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.inference.sampling import (
    SamplingBatch,
    SamplingParams,
    processed_logits,
    prompt_mask,
    sample,
    seed_key_data,
    speculative_accept,
    top_logprobs,
    update_counts,
)

_processed = jax.jit(processed_logits)
_sample = jax.jit(sample)
_sample_steps = jax.jit(jax.vmap(sample, in_axes=(None, None, None, None, 0)))  # → [N, B]
_accept = jax.jit(speculative_accept)

# A distribution whose sorted cumulative sums are exact in binary: .5, .75, .875, .975, 1.
P5 = np.array([0.5, 0.25, 0.125, 0.1, 0.025])


def batch_of(params, vocab: int) -> SamplingBatch:
    return SamplingBatch.from_params(params, vocab, default_seed=0)


def processed(logits, params, counts=None, in_prompt=None) -> np.ndarray:
    """processed_logits on one logits row per params (a single row is shared by all)."""
    logits = np.atleast_2d(np.asarray(logits, np.float32))
    shape = (len(params), logits.shape[-1])
    logits = np.broadcast_to(logits, shape)
    counts = np.zeros(shape, np.int32) if counts is None else np.broadcast_to(counts, shape)
    in_prompt = np.zeros(shape, bool) if in_prompt is None else np.broadcast_to(in_prompt, shape)
    batch = batch_of(params, shape[1])
    return np.asarray(_processed(logits, batch, counts, in_prompt))


def kept(row) -> set[int]:
    return {int(i) for i in np.flatnonzero(np.isfinite(row))}


def np_log_softmax(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def assert_frequencies(tokens, expected, n_cells=None) -> None:
    """Empirical frequencies of `tokens` within 4.5σ of `expected`; zero-probability never drawn."""
    expected = np.asarray(expected, np.float64)
    n = tokens.size
    freq = np.bincount(np.asarray(tokens).ravel(), minlength=n_cells or expected.size) / n
    assert np.all(freq[expected == 0] == 0), (freq, expected)
    bound = 4.5 * np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= bound), (freq, expected, bound)


# ----------------------------------------------------------------------------------------------
# Penalties, bias, temperature
# ----------------------------------------------------------------------------------------------

LOGITS6 = np.array([2.0, -1.0, 0.5, 3.0, -2.0, 0.0])
COUNTS6 = np.array([0, 2, 1, 0, 0, 3], np.int32)  # generated tokens 1, 2, 5
PROMPT6 = np.array([True, False, False, False, True, False])  # prompt tokens 0, 4


def test_repetition_penalty_over_prompt_and_output():
    out = processed(LOGITS6, [SamplingParams(repetition_penalty=2.0)], COUNTS6, PROMPT6)
    # 0 (prompt, >0): 2/2; 1: −1·2; 2: .5/2; 3 unseen; 4 (prompt, <0): −2·2; 5: 0 → 0·2.
    np.testing.assert_allclose(out[0], [1.0, -2.0, 0.25, 3.0, -4.0, 0.0], rtol=0, atol=1e-6)


def test_presence_and_frequency_over_output_only():
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5),
    ]
    out = processed(LOGITS6, params, COUNTS6, PROMPT6)
    # Prompt tokens 0 and 4 untouched; 1: count 2, 2: count 1, 5: count 3.
    np.testing.assert_allclose(
        out, [[2.0, -2.0, -0.25, 3.0, -2.0, -1.25], [2.0, 1.0, 2.0, 3.0, -2.0, 2.5]], atol=1e-6
    )


def test_logit_bias_with_string_keys():
    params = SamplingParams(logit_bias={"1": 5, 4: -100.0})
    assert params.logit_bias == {1: 5, 4: -100.0}
    out = processed(LOGITS6, [params])
    np.testing.assert_allclose(out[0], [2.0, 4.0, 0.5, 3.0, -102.0, 0.0], atol=1e-6)


def test_combination_order():
    params = SamplingParams(
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logit_bias={3: -1.5, "4": 10.0},
        temperature=0.5,
    )
    out = processed(LOGITS6, [params], COUNTS6, PROMPT6)
    # a: [1, −2, .25, 3, −4, 0]; b: [1, −3, −.5, 3, −4, −1.25]; c: [1, −3, −.5, 1.5, 6, −1.25];
    # d: ×2. Any other order gives a different token 1 (b before a) or token 4 (c before a).
    np.testing.assert_allclose(out[0], [2.0, -6.0, -1.0, 3.0, 12.0, -2.5], atol=1e-6)


def test_temperature_probabilities():
    logits = np.array([1.0, 2.0, 3.0, 0.0, -1.0])
    params = [SamplingParams(temperature=t) for t in (0.5, 1.0, 1.5, 2.0)]
    out = processed(logits, params)
    for t, row in zip((0.5, 1.0, 1.5, 2.0), out, strict=True):
        expected = np.exp(logits / t) / np.exp(logits / t).sum()
        np.testing.assert_allclose(np.exp(np_log_softmax(row)), expected, rtol=1e-5)
        np.testing.assert_allclose(row, logits / t, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------------------------


def test_top_k_keeps_ties():
    logits = np.array([1.0, 3.0, 2.0, 3.0, 0.5, 2.0])  # sorted: 3, 3, 2, 2, 1, .5
    ks = [1, 2, 3, 4, 5, 0, -1, 10]
    out = processed(logits, [SamplingParams(top_k=k) for k in ks])
    expected = [{1, 3}, {1, 3}, {1, 2, 3, 5}, {1, 2, 3, 5}, {0, 1, 2, 3, 5}] + [set(range(6))] * 3
    assert [kept(row) for row in out] == expected
    np.testing.assert_array_equal(out[2][[1, 2, 3, 5]], [3.0, 2.0, 3.0, 2.0])


def test_top_p_keeps_crossing_token():
    perm = [2, 4, 0, 3, 1]  # token perm[j] has the j-th largest probability
    probs = np.empty(5)
    probs[perm] = P5  # [.125, .025, .5, .1, .25]
    top_ps = [0.1, 0.5, 0.6, 0.75, 0.76, 0.875, 0.9, 0.98, 1.0]
    # Exactly reaching top_p (.5, .75, .875) stops there; otherwise the crossing token is kept.
    sizes = [1, 1, 2, 2, 3, 3, 4, 5, 5]
    out = processed(np.log(probs), [SamplingParams(top_p=p) for p in top_ps])
    assert [kept(row) for row in out] == [set(perm[:n]) for n in sizes]
    np.testing.assert_allclose(out[3][[2, 4]], np.log([0.5, 0.25]), rtol=1e-6)


def test_top_p_keeps_ties_with_last_token():
    probs = np.array([0.4, 0.2, 0.2, 0.1, 0.1])
    out = processed(np.log(probs), [SamplingParams(top_p=p) for p in (0.4, 0.5, 0.65, 0.85)])
    # .5 is crossed by one of the two 0.2s: both are kept; .85 by one of the 0.1s: all kept.
    assert [kept(row) for row in out] == [{0}, {0, 1, 2}, {0, 1, 2}, set(range(5))]


def test_min_p_on_tempered_distribution():
    logits = np.log(P5)
    params = [
        SamplingParams(min_p=0.0),
        SamplingParams(min_p=0.19),  # threshold .095: drops .025
        SamplingParams(min_p=0.21),  # threshold .105: drops .1 and .025
        SamplingParams(min_p=1.0),  # only the max
        SamplingParams(min_p=0.05, temperature=0.5),  # ratios squared: 1, .25, .0625, .04, .0025
    ]
    out = processed(logits, params)
    assert [kept(row) for row in out] == [set(range(5)), {0, 1, 2, 3}, {0, 1, 2}, {0}, {0, 1, 2}]
    np.testing.assert_allclose(out[4][:3], 2 * logits[:3], rtol=1e-6)
    tied = processed(np.array([2.0, 2.0, 1.0, 0.0]), [SamplingParams(min_p=1.0)])
    assert kept(tied[0]) == {0, 1}


def test_filters_intersect_independently():
    params = [
        # top-p on the whole distribution: .5+.25 < .8 → 3 tokens (on the top-3 survivors
        # renormalised, .571+.286 ≥ .8 would keep only 2).
        SamplingParams(top_k=3, top_p=0.8),
        SamplingParams(top_k=3, top_p=0.6),  # {0,1,2} ∩ {0,1}
        SamplingParams(top_k=2, min_p=0.6),  # {0,1} ∩ {0}
        SamplingParams(top_p=0.9, min_p=0.22),  # {0,1,2,3} ∩ {0,1,2}
    ]
    out = processed(np.log(P5), params)
    assert [kept(row) for row in out] == [{0, 1, 2}, {0, 1}, {0}, {0, 1, 2}]


# ----------------------------------------------------------------------------------------------
# Drawing tokens
# ----------------------------------------------------------------------------------------------


def test_greedy_row_beside_sampled_rows():
    logits = np.array(
        [[2.0, 1.9, 0.0, -1.0], [0.0, 1.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0]], np.float32
    )
    counts = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], np.int32)
    params = [
        SamplingParams(temperature=0.0, presence_penalty=0.5, top_k=3, top_p=0.1),
        SamplingParams(temperature=1.3, top_k=1),
        SamplingParams(seed=3),
    ]
    batch = batch_of(params, 4)
    in_prompt = np.zeros((3, 4), bool)
    out = np.asarray(_processed(logits, batch, counts, in_prompt))
    # The greedy row keeps logits after a–c only: no temperature, no filter, nothing −inf.
    np.testing.assert_allclose(out[0], [1.5, 1.9, 0.0, -1.0], atol=1e-6)
    for step in (0, 1, 2):
        tokens, _ = _sample(logits, batch, counts, in_prompt, step)
        assert tokens.dtype == jnp.int32
        assert list(np.asarray(tokens)[:2]) == [1, 3]  # the penalty moved the greedy argmax


def test_seed_key_data_matches_jax_key():
    for seed in (0, 1, 12345, 2**31 - 1):
        expected = jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))
        np.testing.assert_array_equal(seed_key_data(seed), expected)
    np.testing.assert_array_equal(seed_key_data(2**40 + 7), [256, 7])
    np.testing.assert_array_equal(seed_key_data(-1), [2**32 - 1, 2**32 - 1])


def test_same_seed_same_tokens_anywhere_in_any_batch():
    rng = np.random.default_rng(0)
    v, steps = 6, np.arange(50)
    mine = rng.normal(size=v).astype(np.float32)
    others = rng.normal(size=(4, v)).astype(np.float32)
    zeros, no_prompt = np.zeros((3, v), np.int32), np.zeros((3, v), bool)

    def run(rows, params, step_offsets=(0, 0, 0)):
        batch = batch_of(params, v)
        step = steps[:, None] + np.array(step_offsets)  # [N, B], per-row steps
        return np.asarray(_sample_steps(np.stack(rows), batch, zeros, no_prompt, step)[0])

    a = run(
        [mine, others[0], others[1]],
        [SamplingParams(seed=7), SamplingParams(), SamplingParams(top_k=2)],
    )
    b = run(
        [others[2], others[3], mine],
        [SamplingParams(temperature=0.3), SamplingParams(seed=7), SamplingParams(seed=7)],
        step_offsets=(5, 9, 0),
    )
    c = run([mine] * 3, [SamplingParams(seed=8)] * 3)
    np.testing.assert_array_equal(a[:, 0], b[:, 2])
    np.testing.assert_array_equal(c[:, 0], c[:, 2])
    assert np.mean(a[:, 0] != c[:, 0]) > 0.3  # a different seed gives a different sequence
    assert np.mean(a[:-1, 0] != a[1:, 0]) > 0.3  # and steps differ from each other


def test_default_seed():
    params = [SamplingParams(), SamplingParams(seed=5), SamplingParams()]
    one = SamplingBatch.from_params(params, 4, default_seed=11).seed
    two = SamplingBatch.from_params(params, 4, default_seed=11).seed
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one[1], [0, 5])
    assert not np.array_equal(one[0], one[2])
    fresh = [SamplingBatch.from_params(params, 4).seed for _ in range(2)]
    assert not np.array_equal(fresh[0], fresh[1])


def test_sampled_frequencies_match_filtered_distribution():
    n = 20_000
    p7 = np.array([0.3, 0.2, 0.15, 0.15, 0.1, 0.06, 0.04])
    p4 = np.array([0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0])
    logits = np.log(np.stack([p7, p7, np.maximum(p4, 1e-30)])).astype(np.float32)
    params = [
        SamplingParams(seed=1),
        # top-k 5 → {0..4}; top-p .7 crosses at a 0.15 (tied) → {0..3}; min-p .4 → p ≥ .12.
        SamplingParams(seed=2, top_k=5, top_p=0.7, min_p=0.4),
        SamplingParams(seed=3, temperature=0.5, top_k=3),  # p ∝ p4², first three
    ]
    batch = batch_of(params, 7)
    zeros, no_prompt = np.zeros((3, 7), np.int32), np.zeros((3, 7), bool)
    tokens = np.asarray(_sample_steps(logits, batch, zeros, no_prompt, np.arange(n))[0])  # [N, 3]
    assert_frequencies(tokens[:, 0], p7)
    assert_frequencies(tokens[:, 1], np.r_[p7[:4], 0, 0, 0] / p7[:4].sum())
    tempered = np.r_[p4[:3] ** 2, 0, 0, 0, 0]
    assert_frequencies(tokens[:, 2], tempered / tempered.sum())


def test_logprobs_are_raw():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 7)).astype(np.float32) * 3
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.7),
        SamplingParams(temperature=0.4, top_k=2, logit_bias={0: 3.0}),
        SamplingParams(presence_penalty=1.0),
    ]
    counts = np.ones((3, 7), np.int32)
    tokens, logprobs = _sample(logits, batch_of(params, 7), counts, np.zeros((3, 7), bool), 4)
    expected = np_log_softmax(logits)[np.arange(3), np.asarray(tokens)]
    np.testing.assert_allclose(logprobs, expected, rtol=0, atol=1e-6)

    ids, values = jax.jit(top_logprobs, static_argnums=1)(logits, 3)
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :3]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(
        values, np.take_along_axis(np_log_softmax(logits), order, -1), atol=1e-6
    )
    assert top_logprobs(logits, 0)[0].shape == (3, 0)


def test_update_counts_and_prompt_mask():
    counts = np.zeros((3, 5), np.int32)
    counts = update_counts(counts, jnp.array([1, 4, 2]), jnp.array([True, True, False]))
    counts = update_counts(counts, jnp.array([1, 0, 2]), jnp.array([True, True, True]))
    np.testing.assert_array_equal(counts, [[0, 2, 0, 0, 0], [1, 0, 0, 0, 1], [0, 0, 1, 0, 0]])

    ids = jnp.array([[3, 1, 3, 0], [2, 4, 0, 0], [1, 1, 1, 1]])
    by_length = prompt_mask(ids, jnp.array([3, 2, 0]), 5)
    by_mask = prompt_mask(ids, jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool), 5)
    expected = [[False, True, False, True, False], [False, False, True, False, True], [False] * 5]
    np.testing.assert_array_equal(by_length, expected)
    np.testing.assert_array_equal(by_mask, expected)
    # Padding with an out-of-vocabulary id is ignored.
    pad = prompt_mask(jnp.array([[2, -1, 99]]), jnp.array([1]), 5)
    np.testing.assert_array_equal(pad, [[False, False, True, False, False]])


# ----------------------------------------------------------------------------------------------
# Speculative acceptance
# ----------------------------------------------------------------------------------------------


def one_hot_logits(tokens, v) -> np.ndarray:
    """Point masses as logits: 0 at the token, −inf elsewhere. [..., V]."""
    out = np.full((*np.shape(tokens), v), -np.inf, np.float32)
    np.put_along_axis(out, np.asarray(tokens)[..., None], 0.0, axis=-1)
    return out


def test_speculative_hand_cases():
    v, k = 5, 3
    rng = np.random.default_rng(2)
    best = np.array([2, 4, 1, 3])  # target argmax at positions 0..3
    target = rng.normal(size=(k + 1, v)).astype(np.float32)
    target[np.arange(k + 1), best] = 10.0
    drafts = np.array(
        [[0, 4, 1], [2, 4, 0], [2, 4, 1], [2, 4, 1], [3, 4, 1]], np.int32
    )  # greedy: reject at 0, accept 2, accept all; sampled: all, reject at 0
    targets = np.stack([target] * 3 + [one_hot_logits(best, v)] * 2)
    draft_logits = one_hot_logits(drafts, v)  # the drafter took its argmax
    greedy = np.array([True, True, True, False, False])
    keys = jax.random.key_data(jax.random.split(jax.random.key(0, impl="threefry2x32"), 5))
    n, nxt = _accept(targets, draft_logits, drafts, greedy, keys)
    # Sampled row 3: p(x) = q(x) = 1 everywhere → all accepted, bonus ~ p_3 = point mass at 3.
    # Sampled row 4: p_0(3) = 0 → rejected; residual max(0, p_0 − q_0) is the point mass at 2.
    np.testing.assert_array_equal(n, [0, 2, 3, 3, 0])
    np.testing.assert_array_equal(nxt, [2, 1, 3, 3, 2])


def test_speculative_emits_target_distribution():
    n, v, k = 50_000, 5, 2
    rng = np.random.default_rng(3)
    p_logits = (
        rng.normal(size=(k + 2, v)).astype(np.float32) * 1.5
    )  # stateless target, per position
    q_logits = rng.normal(size=(k + 1, v)).astype(np.float32) * 1.5  # stateless draft, per position
    p = np.exp(np_log_softmax(p_logits))
    q = np.exp(np_log_softmax(q_logits))
    root = jax.random.key(4, impl="threefry2x32")

    def round_at(pos: int, key):
        """One speculation round starting at absolute position `pos`, for n independent trials."""
        drafts = np.stack([rng.choice(v, size=n, p=q[pos + i]) for i in range(k)], 1)  # [n, k]
        target = np.broadcast_to(p_logits[pos : pos + k + 1], (n, k + 1, v))
        draft = np.broadcast_to(q_logits[pos : pos + k], (n, k, v))
        keys = jax.random.key_data(jax.random.split(key, n))
        accepted, nxt = _accept(target, draft, drafts.astype(np.int32), np.zeros(n, bool), keys)
        emitted = np.concatenate([drafts, np.full((n, 1), -1)], 1)
        emitted[np.arange(n), np.asarray(accepted)] = np.asarray(nxt)  # drafts[:a] then next
        return np.asarray(accepted), emitted

    k1, k2 = jax.random.split(root)
    accepted, first = round_at(0, k1)
    _, second = round_at(1, k2)  # the next round, used where round one emitted one token

    assert_frequencies(first[:, 0], p[0])
    # Draft 0 is accepted with probability Σ min(p_0, q_0).
    rate = np.minimum(p[0], q[0]).sum()
    assert abs(np.mean(accepted > 0) - rate) <= 4.5 * math.sqrt(rate * (1 - rate) / n)
    # The first two emitted tokens are jointly p_0 ⊗ p_1.
    pair = np.where(accepted > 0, first[:, 1], second[:, 0])
    assert_frequencies(first[:, 0] * v + pair, np.outer(p[0], p[1]).ravel())


# ----------------------------------------------------------------------------------------------
# Validation and parsing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"frequency_penalty": 2.1}, "frequency_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"logit_bias": {5: -100.5}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {10: 1}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop_token_ids": [10]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 3}, "top_logprobs requires logprobs"),
    ],
)
def test_validation_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs).validate(vocab_size=10)


def test_validation_message_and_edges():
    with pytest.raises(ValueError) as err:
        SamplingParams(temperature=2.5).validate()
    assert str(err.value) == "temperature must be in [0, 2], got 2.5"
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        SamplingParams(top_p=0).validate()
    edges = [
        SamplingParams(temperature=0, top_p=1, top_k=-1, min_p=0, presence_penalty=-2),
        SamplingParams(temperature=2, top_k=1, min_p=1, presence_penalty=2, frequency_penalty=-2),
        SamplingParams(frequency_penalty=2, repetition_penalty=0.01, logit_bias={0: -100, 9: 100}),
        SamplingParams(stop=["s"] * 16, stop_token_ids=[0, 9], max_tokens=1, seed=-(2**63)),
        SamplingParams(logprobs=True, top_logprobs=0, seed=2**64 - 1),
        SamplingParams(logprobs=True, top_logprobs=20, top_k=1000),
    ]
    for params in edges:
        params.validate(vocab_size=10)
    with pytest.raises(ValueError, match=r"row 1: top_p"):
        SamplingBatch.from_params([SamplingParams(), SamplingParams(top_p=2.0)], 10)


def test_from_openai():
    body = {
        "model": "qwen",
        "messages": [],
        "temperature": 0.2,
        "top_p": None,  # JSON null → default
        "logit_bias": {"7": -3},
        "stop": "###",
        "max_tokens": 5,
        "max_completion_tokens": 9,
        "logprobs": True,
        "top_logprobs": 2,
        "top_k": 4,
        "stop_token_ids": [1, 2],
    }
    params = SamplingParams.from_openai(body).validate(vocab_size=10)
    assert params == SamplingParams(
        temperature=0.2,
        logit_bias={7: -3},
        stop=("###",),
        max_tokens=9,
        logprobs=True,
        top_logprobs=2,
        top_k=4,
        stop_token_ids=(1, 2),
    )
    assert SamplingParams.from_openai({"max_tokens": 5}).max_tokens == 5
