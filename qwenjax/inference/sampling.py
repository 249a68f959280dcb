"""Per-request sampling: OpenAI Chat Completions parameters (+ vLLM's extras) as batched JAX math.

One decoding step turns fp32 logits `ℓ ∈ R^V` of each row into the sampling distribution's logits,
in this order (per row, with that row's own parameters):

  a. repetition penalty r (HF / vLLM), over every token seen in the prompt OR the output so far:
     ℓ_v ← ℓ_v / r if ℓ_v > 0 else ℓ_v · r   (r > 1 makes a seen token less likely either way);
  b. presence and frequency penalties (OpenAI), over OUTPUT tokens only, with c_v the number of
     times v was generated: ℓ_v ← ℓ_v − presence · [c_v > 0] − frequency · c_v;
  c. logit bias: ℓ_v ← ℓ_v + bias_v;
  d. temperature: s_v = ℓ_v / T  (skipped on greedy rows, T = 0);
  e. top-k: keep the tokens with s_v ≥ the k-th largest s (ties with the k-th value are all kept);
  f. top-p (nucleus): sort p = softmax(s) descending; keep the smallest prefix whose cumulative
     probability reaches top_p (the token that crosses top_p is kept, at least one token always is),
     plus any token tied with the prefix's last one, so that the kept set never depends on token
     order. "Reaches" allows 1e-6 of fp32 rounding (a prefix summing to exactly top_p in real
     arithmetic stops there), and top_p = 1 keeps everything;
  g. min-p: keep v with p_v ≥ min_p · max(p), tested as s_v − max(s) ≥ log(min_p).

The filters e–g are each computed on the temperature-scaled distribution (d) of the whole vocabulary
and intersected (a token survives only if all three keep it); all three keep the argmax, so the
intersection is never empty. Note that this differs from applying them one after another on the
renormalised survivors (vLLM applies top-p to the top-k survivors): with p = (.5, .25, .125, .1,
.025), top_k = 3 and top_p = 0.8 keep three tokens here, two there. Dropped tokens get −inf, kept
ones their scaled logit s_v (unnormalised: a categorical draw needs no normalisation). Greedy rows
return the logits after a–c; their argmax is the token, and the filters would not change it.

Randomness: each row owns a base key (raw threefry2x32 key data, [2] uint32, from the request's
`seed` or drawn from a NumPy generator), and step n of that row draws with `fold_in(key, n)`. A
row's tokens therefore depend only on its own seed, logits and step, never on its batch companions
or its position in the batch. The reported logprob of the chosen token is taken from the log-softmax
of the RAW logits, before any penalty, temperature or filter (vLLM's default `raw_logprobs`).

Speculative decoding (Leviathan et al. 2023, Chen et al. 2023): with draft distributions q_i that
proposed x_i and target distributions p_i, draft i is accepted with probability min(1, p_i(x_i) /
q_i(x_i)), in order, stopping at the first rejection; on rejection at i the replacement token is
drawn from norm(max(0, p_i − q_i)), and if all k drafts are accepted a bonus token is drawn from
p_k. Every emitted token is then distributed exactly as the target would have sampled it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Below this temperature a row is decoded greedily (vLLM's _SAMPLING_EPS): dividing by a tiny T
# would overflow fp32 logits, and the distribution is a point mass in the limit anyway.
GREEDY_TEMPERATURE = 1e-5
# fp32 rounding slack on top-p's cumulative sum (see the module docstring).
TOP_P_TOLERANCE = 1e-6
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
_KEY_IMPL = "threefry2x32"  # fixed, so the [B, 2] key data means the same under any jax config


# ----------------------------------------------------------------------------------------------
# One request's parameters
# ----------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_range(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> None:
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if not _is_number(value):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    inside = (lo < value if lo_open else lo <= value) and value <= hi  # NaN fails both
    if not inside:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _check_token(name: str, value: Any, vocab_size: int | None) -> None:
    if not _is_int(value) or value < 0 or (vocab_size is not None and value >= vocab_size):
        allowed = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise ValueError(f"{name} must be a token id in {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling options of ONE request, with OpenAI's names and ranges (+ vLLM's extras).

    Construction only normalises shapes (a single stop string becomes a 1-tuple, string token ids in
    `logit_bias` become ints, as OpenAI's JSON sends them); `validate` checks the ranges.
    """

    temperature: float = 1.0  # [0, 2]; 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 or -1 = disabled, else >= 1 (k >= V keeps everything)
    min_p: float = 0.0  # [0, 1]
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # > 0; 1 = off
    logit_bias: Mapping[int, float] | None = None  # token id → [-100, 100]
    seed: int | None = None
    stop: str | Sequence[str] | None = None  # up to 16 non-empty strings
    stop_token_ids: Sequence[int] = ()
    max_tokens: int | None = None  # >= 1
    logprobs: bool = False
    top_logprobs: int | None = None  # [0, 20]; requires logprobs=True
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, Sequence):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, Sequence) and not isinstance(self.stop_token_ids, str):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.logit_bias, Mapping):
            object.__setattr__(
                self, "logit_bias", {_token_key(k): v for k, v in self.logit_bias.items()}
            )

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise ValueError naming the first out-of-range parameter; return self otherwise."""
        _check_range("temperature", self.temperature, 0, 2)
        _check_range("top_p", self.top_p, 0, 1, lo_open=True)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k!r}")
        _check_range("min_p", self.min_p, 0, 1)
        _check_range("presence_penalty", self.presence_penalty, -2, 2)
        _check_range("frequency_penalty", self.frequency_penalty, -2, 2)
        r = self.repetition_penalty
        if not _is_number(r) or not (0 < r < math.inf):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {r!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(f"logit_bias must be a mapping, got {self.logit_bias!r}")
            for token, bias in self.logit_bias.items():
                _check_token(f"logit_bias key {token!r}", token, vocab_size)
                _check_range(f"logit_bias[{token}]", bias, -100, 100)
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if self.stop is not None:
            if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
                raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
            if len(self.stop) > MAX_STOP_STRINGS:
                raise ValueError(
                    f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}"
                )
            if any(s == "" for s in self.stop):
                raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, tuple):
            raise ValueError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
        for i, token in enumerate(self.stop_token_ids):
            _check_token(f"stop_token_ids[{i}]", token, vocab_size)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("logprobs", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.top_logprobs is not None:
            n = self.top_logprobs
            if not _is_int(n) or not 0 <= n <= MAX_TOP_LOGPROBS:
                raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {n!r}")
            if not self.logprobs:
                raise ValueError(f"top_logprobs requires logprobs=True, got top_logprobs={n}")
        return self

    @property
    def greedy(self) -> bool:
        return _is_number(self.temperature) and self.temperature < GREEDY_TEMPERATURE

    @classmethod
    def from_openai(cls, body: Mapping[str, Any]) -> SamplingParams:
        """The sampling subset of a Chat Completions request body (not validated; unknown keys and
        JSON nulls are ignored). `max_completion_tokens` wins over its deprecated alias
        `max_tokens`, as in vLLM."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "max_tokens"]
        kwargs = {name: body[name] for name in names if body.get(name) is not None}
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        return cls(**kwargs)


def _token_key(key: Any) -> Any:
    """OpenAI's JSON keys are strings ("50256"); unparsable keys are kept for validate to name."""
    if isinstance(key, str):
        try:
            return int(key)
        except ValueError:
            return key
    return key


# ----------------------------------------------------------------------------------------------
# A batch of requests as arrays
# ----------------------------------------------------------------------------------------------


def seed_key_data(seed: int) -> np.ndarray:
    """Raw threefry key data [2] uint32 of a 64-bit seed (== `jax.random.key(seed)` for small
    non-negative seeds); negative seeds wrap modulo 2^64."""
    seed %= 2**64
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters of a batch of B requests; every field is an array."""

    temperature: jax.Array  # [B] f32 (as requested; not used on greedy rows)
    top_p: jax.Array  # [B] f32
    top_k: jax.Array  # [B] i32, 0 = off (also for -1 and k >= V)
    min_p: jax.Array  # [B] f32
    presence: jax.Array  # [B] f32
    frequency: jax.Array  # [B] f32
    repetition: jax.Array  # [B] f32
    bias: jax.Array  # [B, V] f32, dense logit bias
    greedy: jax.Array  # [B] bool
    seed: jax.Array  # [B, 2] uint32, raw threefry2x32 key data of each row's base key

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], vocab_size: int, *, default_seed: int | None = None
    ) -> SamplingBatch:
        """Validate and stack. Rows without a seed get one from `np.random.default_rng(
        default_seed)`: random by default, reproducible when `default_seed` is given."""
        for i, p in enumerate(params):
            try:
                p.validate(vocab_size)
            except ValueError as e:
                raise ValueError(f"row {i}: {e}") from e
        rng = np.random.default_rng(default_seed)
        b = len(params)
        bias = np.zeros((b, vocab_size), np.float32)
        seeds = np.zeros((b, 2), np.uint32)
        for i, p in enumerate(params):
            for token, value in (p.logit_bias or {}).items():
                bias[i, token] = value
            seed = p.seed if p.seed is not None else int(rng.integers(0, 2**64, dtype=np.uint64))
            seeds[i] = seed_key_data(seed)
        top_k = [0 if p.top_k <= 0 or p.top_k >= vocab_size else p.top_k for p in params]

        def f32(name: str) -> jax.Array:
            return jnp.asarray(np.array([getattr(p, name) for p in params], np.float32))

        return cls(
            temperature=f32("temperature"),
            top_p=f32("top_p"),
            top_k=jnp.asarray(np.array(top_k, np.int32)),
            min_p=f32("min_p"),
            presence=f32("presence_penalty"),
            frequency=f32("frequency_penalty"),
            repetition=f32("repetition_penalty"),
            bias=jnp.asarray(bias),
            greedy=jnp.asarray(np.array([p.greedy for p in params], bool)),
            seed=jnp.asarray(seeds),
        )


# ----------------------------------------------------------------------------------------------
# The distribution and the draw
# ----------------------------------------------------------------------------------------------


def _keep_mask(scaled: jax.Array, batch: SamplingBatch) -> jax.Array:
    """top-k ∩ top-p ∩ min-p on temperature-scaled logits [B, V] → keep [B, V] bool (one sort)."""
    v = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)  # [B, V] largest first

    # Top-k as a value threshold, so ties with the k-th value survive.
    k = jnp.where(batch.top_k <= 0, v, jnp.minimum(batch.top_k, v))  # [B]
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    keep = scaled >= kth

    # Top-p: the prefix is every sorted position whose EXCLUSIVE cumulative probability is still
    # short of top_p, i.e. up to and including the crossing token; softmax commutes with the sort.
    probs = jax.nn.softmax(desc, axis=-1)  # [B, V]
    before = jnp.cumsum(probs, axis=-1) - probs  # [B, V] mass strictly above each position
    short = before < (batch.top_p - TOP_P_TOLERANCE)[:, None]
    n = jnp.maximum(jnp.sum(short, axis=-1), 1)  # [B] prefix length, >= 1
    last = jnp.take_along_axis(desc, (n - 1)[:, None], axis=-1)  # [B, 1]
    keep &= (scaled >= last) | (batch.top_p >= 1.0)[:, None]

    # Min-p in log space: p_v / p_max = exp(s_v − s_max); log(0) = −inf keeps everything.
    keep &= scaled - desc[:, :1] >= jnp.log(batch.min_p)[:, None]
    return keep


def processed_logits(
    logits: jax.Array, batch: SamplingBatch, counts: jax.Array, in_prompt: jax.Array
) -> jax.Array:
    """Logits [B, V] f32 of the sampling distribution (steps a–g of the module docstring).

    counts [B, V] i32: times each token was generated so far; in_prompt [B, V] bool.
    """
    logits = logits.astype(jnp.float32)
    generated = counts > 0  # [B, V]

    r = batch.repetition[:, None]
    penalised = jnp.where(logits > 0, logits / r, logits * r)
    logits = jnp.where(in_prompt | generated, penalised, logits)

    logits = logits - batch.presence[:, None] * generated.astype(jnp.float32)
    logits = logits - batch.frequency[:, None] * counts.astype(jnp.float32)
    logits = logits + batch.bias

    t = jnp.where(batch.greedy, 1.0, batch.temperature)  # [B], no division by 0 on greedy rows
    scaled = logits / t[:, None]
    filtered = jnp.where(_keep_mask(scaled, batch), scaled, -jnp.inf)
    return jnp.where(batch.greedy[:, None], logits, filtered)


def _row_key(key_data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(key_data, impl=_KEY_IMPL)


def sample(
    logits: jax.Array,
    batch: SamplingBatch,
    counts: jax.Array,
    in_prompt: jax.Array,
    step: jax.Array | int,
) -> tuple[jax.Array, jax.Array]:
    """One token per row → (tokens [B] i32, logprobs [B] f32).

    Greedy rows take the argmax of the processed logits; the others draw with key
    `fold_in(row key, step)`. `step` is a scalar or per-row [B] (each request's own decode index,
    which keeps a request reproducible wherever it joins a continuous batch). The logprob is the
    raw log-softmax of `logits` at the token (vLLM's `raw_logprobs`), not of the filtered
    distribution.
    """
    processed = processed_logits(logits, batch, counts, in_prompt)  # [B, V]
    step = jnp.broadcast_to(jnp.asarray(step, jnp.uint32), batch.greedy.shape)  # [B]

    def draw(key_data: jax.Array, n: jax.Array, row: jax.Array) -> jax.Array:
        return jax.random.categorical(jax.random.fold_in(_row_key(key_data), n), row)

    drawn = jax.vmap(draw)(batch.seed, step, processed)  # [B]
    tokens = jnp.where(batch.greedy, jnp.argmax(processed, axis=-1), drawn).astype(jnp.int32)
    raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, V]
    return tokens, jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]


def top_logprobs(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k most likely tokens of the RAW distribution → (ids [B, k] i32, logprobs [B, k] f32),
    most likely first (ties: lower id first). k is static."""
    raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, V]
    if k == 0:
        return jnp.zeros((*raw.shape[:-1], 0), jnp.int32), jnp.zeros((*raw.shape[:-1], 0))
    values, ids = jax.lax.top_k(raw, k)
    return ids.astype(jnp.int32), values


# ----------------------------------------------------------------------------------------------
# Bookkeeping for the penalties
# ----------------------------------------------------------------------------------------------


def update_counts(counts: jax.Array, tokens: jax.Array, active: jax.Array) -> jax.Array:
    """counts [B, V] i32 plus one at (row, tokens[row]) for every active row ([B] bool)."""
    counts = jnp.asarray(counts)
    rows = jnp.arange(counts.shape[0])
    return counts.at[rows, tokens].add(active.astype(counts.dtype))


def prompt_mask(input_ids: jax.Array, valid: jax.Array, vocab_size: int) -> jax.Array:
    """in_prompt [B, V] bool from prompt ids [B, T] and either lengths [B] (the first lengths[b]
    positions are the prompt) or a valid mask [B, T] bool (padding anywhere)."""
    input_ids, valid = jnp.asarray(input_ids), jnp.asarray(valid)
    b, t = input_ids.shape
    if valid.ndim == 1:
        valid = jnp.arange(t)[None, :] < valid[:, None]  # [B, T]
    # Padding scatters to the out-of-range id V and is dropped, so a pad id never marks a token.
    ids = jnp.where(valid, input_ids, vocab_size)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return jnp.zeros((b, vocab_size), bool).at[rows, ids].set(True, mode="drop")


# ----------------------------------------------------------------------------------------------
# Speculative decoding
# ----------------------------------------------------------------------------------------------


def speculative_accept(
    target_logits: jax.Array,
    draft_logits: jax.Array,
    draft_tokens: jax.Array,
    greedy: jax.Array,
    keys: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Rejection-sample k drafted tokens against the target → (num_accepted [B] i32 in 0..k,
    next_token [B] i32).

    target_logits [B, k+1, V] and draft_logits [B, k, V] are PROCESSED logits (`processed_logits`,
    −inf allowed) of the target at each draft position plus the bonus position, and of the draft
    distribution each draft token [B, k] was drawn from. A drafter that took its argmax drew from a
    point mass: pass −inf everywhere but the drafted token. keys [B, 2] is per-row raw key data
    with the step already folded in. The emitted tokens are drafts[:num_accepted] then next_token.

    Sampled rows: the standard acceptance test u · q_i(x_i) < p_i(x_i) (u ~ U[0, 1), i.e. accept
    with probability min(1, p/q) without dividing by q); next_token ~ norm(max(0, p_n − q_n)) at the
    first rejection n, or ~ p_k when all are accepted (q_k := 0 makes that the same formula).
    Greedy rows: accept while draft == argmax target; next_token = argmax target at position n.
    """

    def row(
        target: jax.Array,  # [k+1, V]
        draft: jax.Array,  # [k, V]
        tokens: jax.Array,  # [k]
        is_greedy: jax.Array,
        key_data: jax.Array,  # [2]
    ) -> tuple[jax.Array, jax.Array]:
        k = tokens.shape[0]
        p = jax.nn.softmax(target.astype(jnp.float32), axis=-1)  # [k+1, V]
        q = jax.nn.softmax(draft.astype(jnp.float32), axis=-1)  # [k, V]
        key_u, key_next = jax.random.split(_row_key(key_data))
        u = jax.random.uniform(key_u, (k,))
        p_x = jnp.take_along_axis(p[:k], tokens[:, None], axis=-1)[:, 0]  # [k]
        q_x = jnp.take_along_axis(q, tokens[:, None], axis=-1)[:, 0]  # [k]
        best = jnp.argmax(target, axis=-1).astype(jnp.int32)  # [k+1]
        accept = jnp.where(is_greedy, tokens == best[:k], u * q_x < p_x)  # [k]
        n = jnp.sum(jnp.cumprod(accept.astype(jnp.int32)))  # accepted prefix length

        q_pad = jnp.concatenate([q, jnp.zeros_like(p[:1])], axis=0)  # [k+1, V], q_k = 0
        residual = jnp.maximum(p[n] - q_pad[n], 0.0)  # [V]
        # p_n == q_n leaves no residual, but then a rejection has probability 0; guard anyway.
        residual = jnp.where(jnp.sum(residual) > 0, residual, p[n])
        drawn = jax.random.categorical(key_next, jnp.log(residual))
        return n.astype(jnp.int32), jnp.where(is_greedy, best[n], drawn).astype(jnp.int32)

    return jax.vmap(row)(target_logits, draft_logits, draft_tokens, greedy, keys)


# generation_config.json keys used as sampling defaults, with their SamplingParams names.
_GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
}


def checkpoint_defaults(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's `generation_config.json` sampling values as `SamplingParams` fields
    (requests and flags override them, as in vLLM); {} when the file is absent."""
    path = Path(checkpoint) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        found = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    defaults = {ours: found[hf] for hf, ours in _GENERATION_DEFAULTS.items() if hf in found}
    if found.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults
