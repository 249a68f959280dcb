"""Batched generation: a jitted prefill, then a decode loop that stays on device.

    prefill   extend the empty cache with the right-padded prompts (row b keeps its first
              `lengths[b]` tokens), sample token 1 from each row's last prompt position; with
              images or videos (`VisionInputs`) the vision tower's tokens replace the pads and
              the positions are 3-D (mRoPE), and each row's rope delta goes into the cache
    decode    `lax.while_loop`: feed the last token (T = 1, the single-token GDN step), sample,
              append; a row stops at a stop token or its `max_tokens`; the loop ends when every
              row has stopped or `limit` steps ran (so a host can stream in chunks)
    MTP       (speculative) the MTP head drafts k tokens recursively, the trunk verifies
              [last, d_1..d_k] in one forward, `speculative_accept` keeps a prefix plus one token,
              and `commit` rolls the GDN/conv states back to the kept tokens exactly

Every row carries its own sampling options (`SamplingBatch`) and PRNG key; a row's randomness is
`fold_in(key, tokens generated so far)`, so its output does not depend on its batch companions.
A row samples only among its allowed tokens (`Requests.allowed`, a bitmask the serving scheduler
rewrites between steps for grammar-constrained requests; all tokens otherwise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from qwenjax import sharding as ax
from qwenjax.inference.sampling import (
    SamplingBatch,
    SamplingParams,
    processed_logits,
    sample,
    speculative_accept,
    top_logprobs,
)
from qwenjax.kernels.choice import KernelChoice
from qwenjax.kernels.choice import current as current_kernels
from qwenjax.model import Qwen35
from qwenjax.model.cache import (
    Cache,
    DeltaNetCache,
    init_cache,
    logical_axes,
    rope_positions,
    write_rows,
)
from qwenjax.model.deltanet import commit_pending
from qwenjax.vision.encoder import check_grid
from qwenjax.vision.model import VisionInputs
from qwenjax.vision.rope_index import check_vision_tokens

# Prompt widths and cache lengths are rounded up to a power of two (at least this), so a growing
# chat conversation recompiles only when it crosses one.
MIN_BUCKET = 16
KEY_IMPL = "threefry2x32"  # the PRNG of `SamplingBatch.seed` key data, whatever jax's default


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


# Draft tokens are drawn with keys folded away from the target's (which use the output index).
_DRAFT_STREAM = 1 << 30


@dataclasses.dataclass(frozen=True)
class Options:
    """The static shape of one generation job (each distinct value compiles once)."""

    max_new_tokens: int
    max_length: int  # cache slots per row
    num_top_logprobs: int = 0
    num_speculative_tokens: int = 0  # 0: plain decoding
    pad_id: int = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Requests:
    """Per-row inputs that stay fixed during decoding."""

    sampling: SamplingBatch
    in_prompt: jax.Array  # [B, V] bool
    stop_ids: jax.Array  # [B, M] int32, -1 = none
    max_tokens: jax.Array  # [B] int32
    # Test hook (serving tests script replies through the real loop): output token i of row b is
    # forced[b, i] where that is ≥ 0; all -1 otherwise.
    forced: jax.Array  # [B, F] int32
    # A reasoning budget: once a row has made `budget[b, 1]` tokens without token
    # `budget[b, 0]` (e.g. `</think>`), that token is forced. -1 = no budget.
    budget: jax.Array  # [B, 2] int32
    # Constrained decoding: the tokens row b may sample next, one bit per token id (bit v % 32 of
    # word v // 32; all bits set = unconstrained). A grammar changes it after every token, so the
    # serving scheduler rewrites it between plain steps; the speculative step does not read it.
    allowed: jax.Array  # [B, ceil(V / 32)] int32


def all_allowed(batch: int, vocab: int) -> np.ndarray:
    """The `Requests.allowed` of unconstrained rows: `[batch, ceil(vocab / 32)]`, all bits set."""
    return np.full((batch, -(-vocab // 32)), -1, np.int32)


def _unpack(allowed: jax.Array, vocab: int) -> jax.Array:
    """`[B, W]` packed bits → `[B, V]` bool."""
    v = jnp.arange(vocab)
    return (allowed[:, v // 32] >> (v % 32)) & 1 == 1


def _forced_at(s: DecodeState, req: Requests, new: jax.Array) -> jax.Array:
    """`[B, W]` the token that must stand at output index `num_out + j` instead of `new[:, j]`
    (-1: none): the end-of-reasoning token once the budget is spent and it has not appeared (in
    earlier output or in `new` before j), else the test hook's script."""
    idx = s.num_out[:, None] + jnp.arange(new.shape[1])[None, :]  # [B, W]
    f = req.forced.shape[1]
    script = jnp.take_along_axis(req.forced, jnp.minimum(idx, f - 1), axis=1)
    script = jnp.where(idx < f, script, -1)
    end, limit = req.budget[:, :1], req.budget[:, 1:]  # [B, 1]
    hits = new == end
    seen = jnp.take_along_axis(s.counts, jnp.maximum(end, 0), axis=1) > 0
    seen = seen | (jnp.cumsum(hits, axis=1) - hits > 0)
    over = (end >= 0) & (idx >= limit) & ~seen
    return jnp.where(over, end, script)  # a spent budget outranks even the script


def empty_state(
    cache: Cache, width: int, top: int, vocab: int, hidden: int, dtype, pad_id: int, *, real
) -> DecodeState:
    """A decode state before any output: buffers `[B, width]`, `top` top-logprob slots, an MTP
    drafter of width `hidden` (0 without speculation); rows are done unless `real [B]`."""
    b = real.shape[0]
    zeros = lambda dt: jnp.zeros((b,), dt)
    return DecodeState(
        cache=cache,
        tokens=jnp.full((b, width), pad_id, jnp.int32),
        logprobs=jnp.zeros((b, width), jnp.float32),
        top_ids=jnp.zeros((b, width, top), jnp.int32),
        top_logprobs=jnp.zeros((b, width, top), jnp.float32),
        num_out=zeros(jnp.int32),
        last=zeros(jnp.int32),
        done=~real,
        stopped=zeros(bool),
        counts=jnp.zeros((b, vocab), jnp.int32),
        draft_hidden=jnp.zeros((b, hidden), dtype),
        drafted=zeros(jnp.int32),
        accepted=zeros(jnp.int32),
        steps=jnp.zeros((), jnp.int32),
        real=real,
    )


def _sample(logits: jax.Array, s: DecodeState, req: Requests) -> tuple[jax.Array, jax.Array]:
    """`sample` among the allowed tokens, then what `_forced_at` imposes; the logprob is the raw
    one (before the allowed mask, as for every other processing step)."""
    allowed = _unpack(req.allowed, logits.shape[-1])
    tok, _ = sample(
        jnp.where(allowed, logits, -jnp.inf), req.sampling, s.counts, req.in_prompt, s.num_out
    )
    forced = _forced_at(s, req, tok[:, None])[:, 0]
    tok = jnp.where(forced >= 0, forced, tok)
    raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return tok, jnp.take_along_axis(raw, tok[:, None], 1)[:, 0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: Cache
    tokens: jax.Array  # [B, N + k + 1] output ids (pad after the end)
    logprobs: jax.Array  # [B, N + k + 1] raw logprob of each output token
    top_ids: jax.Array  # [B, N + k + 1, L]
    top_logprobs: jax.Array  # [B, N + k + 1, L]
    num_out: jax.Array  # [B] tokens generated
    last: jax.Array  # [B] the last generated token (not yet in the trunk cache)
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool: ended on a stop token (else by length)
    counts: jax.Array  # [B, V] int32 occurrences of each token in the output
    draft_hidden: jax.Array  # [B, D] MTP hidden that drafts the next token (speculative only)
    drafted: jax.Array  # [B] draft tokens proposed
    accepted: jax.Array  # [B] draft tokens accepted
    steps: jax.Array  # [] loop iterations run
    real: jax.Array  # [B] bool: a request, not a row padding the batch to the mesh


def _row_keys(sampling: SamplingBatch, index: jax.Array) -> jax.Array:
    """Raw key data `[B, 2]`: each row's key folded with `index [B]`."""
    fold = lambda seed, i: jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(seed, impl=KEY_IMPL), i)
    )
    return jax.vmap(fold)(sampling.seed, index.astype(jnp.uint32))


def _emit(
    s: DecodeState,
    req: Requests,
    new: jax.Array,
    count: jax.Array,
    logprobs: jax.Array,
    top: tuple[jax.Array, jax.Array],
    opts: Options,
) -> DecodeState:
    """Append up to `count[b]` of `new [B, W]` to each row, cut at a stop token or max_tokens."""
    w = new.shape[1]
    t = jnp.arange(w)[None, :]  # [1, W]
    is_stop = jnp.any(new[..., None] == req.stop_ids[:, None, :], axis=-1)  # [B, W]
    within = (t < count[:, None]) & (t < (req.max_tokens - s.num_out)[:, None]) & ~s.done[:, None]
    # Keep tokens up to and including the first stop token.
    after_stop = jnp.cumsum(is_stop & within, axis=1) - (is_stop & within) > 0
    keep = within & ~after_stop  # [B, W]
    n = jnp.sum(keep, axis=1)  # [B]
    hit_stop = jnp.any(is_stop & keep, axis=1)
    ids = jnp.where(keep, new, opts.pad_id)
    rows = jnp.arange(new.shape[0])[:, None]
    counts = s.counts.at[rows, new].add(keep.astype(jnp.int32))
    num_out = s.num_out + n
    return dataclasses.replace(
        s,
        tokens=write_rows(s.tokens, ids, s.num_out),
        logprobs=write_rows(s.logprobs, jnp.where(keep, logprobs, 0.0), s.num_out),
        top_ids=write_rows(s.top_ids, top[0], s.num_out),
        top_logprobs=write_rows(s.top_logprobs, top[1], s.num_out),
        num_out=num_out,
        last=jnp.where(
            n > 0, jnp.take_along_axis(new, jnp.maximum(n - 1, 0)[:, None], 1)[:, 0], s.last
        ),
        done=s.done | hit_stop | (num_out >= req.max_tokens),
        stopped=s.stopped | hit_stop,
        counts=counts,
    )


def commit(old: Cache, new: Cache, pending: tuple, keep: jax.Array) -> Cache:
    """`new` (after extending `old` by T tokens) cut back to each row's first `keep[b]` tokens.

    KV entries past the kept tokens stay in place but are beyond the length and never read; the
    GDN and conv states are recomputed from `old` and the pending per-token inputs.
    """
    blocks = []
    for o, n, p in zip(old.blocks, new.blocks, pending, strict=True):
        if isinstance(o, DeltaNetCache):
            n = commit_pending(o, p, keep)  # the stacked blocks
        blocks.append(n)
    return dataclasses.replace(new, blocks=tuple(blocks), length=old.length + keep)


def _constrain_cache(cache: Cache) -> Cache:
    return jax.tree.map(ax.constrain, cache, logical_axes(cache))


class StaticGraph:
    """An nnx `GraphDef` as a static jit argument, hashed once, with the kernel pins in force
    when it was made (`qwenjax.kernels.choice.current()`).

    jit hashes its static arguments on every call, and a GraphDef rehashes its whole node list
    each time: 0.4 ms a call for the tiny model, 1.2 ms with the device busy, which was most of
    the serving loop's host time per decode step. Equal graphs under equal pins still share
    compiled programs. The pins are part of the key because they act while tracing, which jit
    does not see: an engine built under `auto_backend("pallas_gpu")` would otherwise reuse the
    programs an earlier one traced with the default kernels. `@traced_under_pins` functions
    trace under the graph's pins, whatever pins surround the call.
    """

    __slots__ = ("_hash", "graphdef", "kernels")

    def __init__(self, graphdef: nnx.GraphDef, kernels: KernelChoice | None = None):
        self.graphdef = graphdef
        self.kernels = current_kernels() if kernels is None else kernels
        self._hash = hash((graphdef, self.kernels))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, StaticGraph)
            and self._hash == other._hash
            and self.kernels == other.kernels
            and self.graphdef == other.graphdef
        )


def traced_under_pins(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn(graphdef: StaticGraph, ...)` traced under the graph's kernel pins (put it under jit)."""

    @functools.wraps(fn)
    def run(graphdef: StaticGraph, *args, **kwargs):
        with graphdef.kernels.exactly():
            return fn(graphdef, *args, **kwargs)

    return run


def _model(graph: StaticGraph, params) -> Qwen35:
    return nnx.merge(graph.graphdef, params)


def _last_logits(model: Qwen35, hidden: jax.Array) -> jax.Array:
    """`[B, T, D]` hidden → `[B, T, V]` fp32 logits."""
    return model.logits(hidden).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
@traced_under_pins
def _prefill(
    graphdef, params, ids, lengths, req: Requests, vision: VisionInputs | None, *, opts: Options
) -> DecodeState:
    model = _model(graphdef, params)
    b = ids.shape[0]
    k = opts.num_speculative_tokens
    spec = k > 0
    cache = init_cache(model.config, b, opts.max_length, model.dtype, mtp=spec)
    cache = _constrain_cache(cache)
    positions = None  # the prompt's rotary positions: the slots, unless multimodal
    if vision is None:
        hidden, cache, _ = model.extend(ids, cache, lengths)  # [B, T, D]
    else:
        hidden, cache, positions = model.extend_multimodal(ids, cache, lengths, **vision.kwargs())
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    logits = _last_logits(model, last)[:, 0]  # [B, V]
    v = logits.shape[-1]
    width = opts.max_new_tokens + k + 1
    slots = opts.num_top_logprobs
    d = model.config.hidden_size if spec else 0
    s = empty_state(cache, width, slots, v, d, model.dtype, opts.pad_id, real=req.max_tokens > 0)
    tok, lp = _sample(logits, s, req)
    top = top_logprobs(logits, slots)
    s = _emit(s, req, tok[:, None], jnp.ones((b,), jnp.int32), lp[:, None], _w1(top), opts)
    if spec:
        # MTP over the prompt: index i pairs h_i with token i+1 (the sampled token after the
        # last prompt token); the output at the last index drafts the first token.
        t = jnp.arange(ids.shape[1])[None, :]
        nxt = jnp.where(t == (lengths - 1)[:, None], tok[:, None], jnp.roll(ids, -1, axis=1))
        m, mtp = model.mtp_extend(hidden, nxt, cache.mtp, jnp.zeros((b,), jnp.int32), positions)
        drafter = jnp.take_along_axis(m, (lengths - 1)[:, None, None], axis=1)[:, 0]
        s = dataclasses.replace(
            s, cache=dataclasses.replace(s.cache, mtp=mtp), draft_hidden=drafter
        )
    return s


def _w1(top: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    return top[0][:, None], top[1][:, None]


def _plain_step(model: Qwen35, s: DecodeState, req: Requests, opts: Options) -> DecodeState:
    active = (~s.done).astype(jnp.int32)
    hidden, cache, _ = model.extend(s.last[:, None], s.cache, active)
    logits = _last_logits(model, hidden)[:, 0]  # [B, V]
    tok, lp = _sample(logits, s, req)
    top = top_logprobs(logits, opts.num_top_logprobs)
    if opts.num_speculative_tokens:
        # A plain step of a speculative job (constrained rows are decoding): keep the MTP cache
        # and drafter current, so the speculative steps after it draft as well as ever.
        positions = s.cache.next_positions(1)
        m, mtp = model.mtp_extend(hidden, tok[:, None], s.cache.mtp, s.cache.length, positions)
        cache = dataclasses.replace(cache, mtp=mtp)
        s = dataclasses.replace(
            s, draft_hidden=jnp.where(active[:, None] > 0, m[:, 0], s.draft_hidden)
        )
    s = dataclasses.replace(s, cache=cache)
    return _emit(s, req, tok[:, None], active, lp[:, None], _w1(top), opts)


def _categorical(key_data: jax.Array, logits: jax.Array) -> jax.Array:
    return jax.random.categorical(jax.random.wrap_key_data(key_data, impl=KEY_IMPL), logits)


def _draft(model: Qwen35, s: DecodeState, req: Requests, k: int):
    """k draft tokens `[B, k]` and the processed draft logits `[B, k, V]` they were drawn from."""
    start = s.cache.length  # trunk slots hold tokens < L; `last` goes to slot L
    hidden, token, mtp = s.draft_hidden, s.last, s.cache.mtp
    tokens, logits = [], []
    for j in range(k):
        if j:  # MTP index L−1+j pairs the previous MTP hidden with the previous draft
            at = start + j - 1
            positions = rope_positions(at, 1, s.cache.rope_delta)
            hidden, mtp = model.mtp_extend(hidden[:, None], token[:, None], mtp, at, positions)
            hidden = hidden[:, 0]
        q = processed_logits(
            _last_logits(model, hidden[:, None])[:, 0], req.sampling, s.counts, req.in_prompt
        )
        keys = _row_keys(req.sampling, _DRAFT_STREAM + s.num_out * k + j)
        drawn = jax.vmap(
            lambda kd, row: jax.random.categorical(jax.random.wrap_key_data(kd, impl=KEY_IMPL), row)
        )(keys, q)
        token = jnp.where(req.sampling.greedy, jnp.argmax(q, -1), drawn).astype(jnp.int32)
        tokens.append(token)
        logits.append(q)
    return jnp.stack(tokens, 1), jnp.stack(logits, 1), mtp


def _speculative_step(model: Qwen35, s: DecodeState, req: Requests, opts: Options) -> DecodeState:
    k = opts.num_speculative_tokens
    drafts, q, mtp = _draft(model, s, req, k)  # [B, k], [B, k, V]
    active = ~s.done
    inputs = jnp.concatenate([s.last[:, None], drafts], axis=1)  # [B, k+1] at slots L..L+k
    count = jnp.where(active, k + 1, 0).astype(jnp.int32)
    hidden, extended, pending = model.extend(inputs, s.cache, count, keep_pending=True)
    logits = _last_logits(model, hidden)  # [B, k+1, V]
    # Position j's penalties count the drafts before it as already generated.
    onehot = jax.nn.one_hot(drafts, logits.shape[-1], dtype=jnp.int32)  # [B, k, V]
    before = jnp.concatenate([jnp.zeros_like(onehot[:, :1]), jnp.cumsum(onehot, 1)], 1)
    p = jax.vmap(
        lambda lg, c: processed_logits(lg, req.sampling, s.counts + c, req.in_prompt),
        in_axes=(1, 1),
        out_axes=1,
    )(logits, before)  # [B, k+1, V]
    n, nxt = speculative_accept(
        p, q, drafts, req.sampling.greedy, _row_keys(req.sampling, s.num_out)
    )
    n = jnp.where(active, n, 0)
    t = jnp.arange(k + 1)[None, :]
    padded = jnp.pad(drafts, ((0, 0), (0, 1)))
    emitted = jnp.where(t < n[:, None], padded, nxt[:, None])  # [B, k+1]
    # A forced token (test hook, reasoning budget) acts like a rejection at its index: the
    # drafts before it are kept and it becomes the next token.
    forced = _forced_at(s, req, emitted)
    wrong = (forced >= 0) & (forced != emitted) & (t <= n[:, None])
    first = jnp.argmax(wrong, axis=1)
    hit = jnp.any(wrong, axis=1)
    nxt = jnp.where(hit, jnp.take_along_axis(forced, first[:, None], 1)[:, 0], nxt)
    n = jnp.where(hit, first, n)
    emitted = jnp.where(t < n[:, None], padded, nxt[:, None])
    raw = jax.nn.log_softmax(logits, axis=-1)
    lp = jnp.take_along_axis(raw, emitted[..., None], axis=-1)[..., 0]
    top = jax.vmap(lambda lg: top_logprobs(lg, opts.num_top_logprobs), in_axes=1, out_axes=1)(
        logits
    )
    cache = commit(s.cache, extended, pending, jnp.where(active, n + 1, 0))
    # MTP catch-up: indices L..L+n pair the verified hiddens with the kept tokens; index L+n
    # (the last token, `nxt`) drafts the first token of the next round.
    positions = s.cache.next_positions(k + 1)
    m, mtp = model.mtp_extend(hidden, emitted, mtp, s.cache.length, positions)
    drafter = jnp.take_along_axis(m, n[:, None, None], axis=1)[:, 0]
    s = dataclasses.replace(
        s,
        cache=dataclasses.replace(cache, mtp=mtp),
        draft_hidden=jnp.where(active[:, None], drafter, s.draft_hidden),
        drafted=s.drafted + jnp.where(active, k, 0),
        accepted=s.accepted + n,
    )
    return _emit(s, req, emitted, n + 1, lp, top, opts)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts", "plain"), donate_argnames=("s",))
@traced_under_pins
def _decode(
    graphdef, params, s: DecodeState, req: Requests, limit, *, opts: Options, plain: bool = False
):
    """Decode until every row is done or `limit` loop iterations have run in total (`plain`:
    one token per iteration even when `opts` speculates, as constrained rows need)."""
    model = _model(graphdef, params)
    step = _speculative_step if opts.num_speculative_tokens and not plain else _plain_step

    def cond(s):
        return (s.steps < limit) & ~jnp.all(s.done)

    def body(s):
        s = step(model, s, req, opts)
        return dataclasses.replace(s, steps=s.steps + 1)

    return jax.lax.while_loop(cond, body, s)


# ------------------------------------------------------------------------------------ host side
@dataclasses.dataclass(frozen=True)
class Generation:
    """What `decode` returns (numpy). Row b's output is `tokens[b, :lengths[b]]`."""

    tokens: np.ndarray  # [B, N], pad_id after each row's end
    lengths: np.ndarray  # [B]
    finish_reasons: list[str]  # "stop" (a stop token, included in tokens) or "length"
    logprobs: np.ndarray  # [B, N] raw log-probability of each token
    top_logprobs: tuple[np.ndarray, np.ndarray] | None  # ids, logprobs [B, N, L]
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def _host(x: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered from the others on a multi-host mesh)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _prompt_mask(rows: list[list[int]], vocab: int) -> np.ndarray:
    """`[B, V]` bool: the token occurs in the row's prompt (for the repetition penalty)."""
    mask = np.zeros((len(rows), vocab), bool)
    for b, row in enumerate(rows):
        mask[b, row] = True
    return mask


def _as_rows(input_ids: Any) -> list[list[int]]:
    if isinstance(input_ids, np.ndarray | jax.Array):
        arr = np.asarray(input_ids)
        if arr.ndim != 2:
            raise ValueError(f"input_ids must be [B, T] or a list of id lists, got {arr.shape}")
        return [list(map(int, row)) for row in arr]
    rows = [list(map(int, row)) for row in input_ids]
    if not rows:
        raise ValueError("input_ids is empty: give at least one prompt")
    return rows


def check_vision(model: Qwen35, ids: np.ndarray, vision: VisionInputs) -> None:
    """Clear errors for vision inputs a jitted prefill could not check: the model has a vision
    tower, the grids describe the pixel rows, and `ids [B, T]` hold the pad runs they expand."""
    if not hasattr(model, "visual"):
        raise ValueError(
            "images or videos need a model with a vision tower: load(..., vision=True)"
        )
    config = model.config.vision
    for name, pixels, grid in (
        ("pixel_values", vision.pixel_values, vision.image_grid_thw),
        ("pixel_values_videos", vision.pixel_values_videos, vision.video_grid_thw),
    ):
        if pixels is not None:
            check_grid(grid, np.shape(pixels)[0], config.spatial_merge_size, name)
            if np.shape(pixels)[1] != config.patch_dim:
                raise ValueError(
                    f"{name} rows have {np.shape(pixels)[1]} values; this vision tower "
                    f"takes {config.patch_dim} (C·Tp·P·P)"
                )
    check_vision_tokens(ids, config, vision.image_grid_thw, vision.video_grid_thw)


class Engine:
    """A model ready to generate: `Engine(model).decode(prompts, params, max_new_tokens)`.

    With `mesh`, the model's parameters should already be sharded there (`load(..., mesh=)`);
    the batch is split over the rules' batch axes and the caches like the parameters.
    """

    def __init__(self, model: Qwen35, *, mesh=None, rules=None):
        self.model = model
        self.config = model.config
        graphdef, self.params = nnx.split(model)
        self.graphdef = StaticGraph(graphdef)
        self.mesh = mesh
        self.rules = ax.RULES["fsdp"] if rules is None and mesh is not None else rules

    def _rules(self):

        return (
            contextlib.nullcontext() if self.mesh is None else ax.use_rules(self.mesh, self.rules)
        )

    def _put(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        names = (ax.BATCH,) + (None,) * (np.ndim(x) - 1)
        return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, ax.spec(names, self.rules)))

    def batch_multiple(self) -> int:
        """Batch sizes must be a multiple of this (the mesh axes the batch is split over)."""
        return ax.batch_split(self.mesh, self.rules)

    def start(
        self,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        *,
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
        num_top_logprobs: int = 0,
        num_speculative_tokens: int = 0,
        pad_id: int = 0,
        default_seed: int | None = None,
        vision: VisionInputs | None = None,
    ) -> tuple[DecodeState, Requests, Options]:
        """Prefill; returns the device state to pass to `step` (for streaming) or `finish`.

        `vision`: the images and videos of the prompts' pad tokens, in row order (the model
        must be a `Qwen35VL`); `VisionInputs.concat` joins per-prompt inputs.
        """
        rows = _as_rows(prompts)
        if len(params) != len(rows):
            raise ValueError(f"{len(rows)} prompts but {len(params)} sampling parameter sets")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        if num_speculative_tokens and self.model.mtp is None:
            raise ValueError("speculative='mtp' needs a model with an MTP head; this one has none")
        v = self.config.vocab_size
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in row if not 0 <= t < v]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {v}): {bad[:5]}")
        # Pad the batch to the mesh with one-token rows that may generate nothing.
        real = len(rows)
        rows = rows + [[pad_id]] * (-real % self.batch_multiple())
        params = list(params) + [SamplingParams(temperature=0.0)] * (len(rows) - real)
        lengths = np.array([len(r) for r in rows], np.int32)
        width = _bucket(int(lengths.max()))
        longest = int(lengths.max()) + max_new_tokens
        if longest > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"the model's max_position_embeddings {self.config.max_position_embeddings}"
            )
        ids = np.full((len(rows), width), pad_id, np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        if vision is not None:
            check_vision(self.model, ids, vision)
        k = num_speculative_tokens
        opts = Options(
            max_new_tokens=max_new_tokens,
            # Verification writes k+1 slots past the length; a write past the end would clamp.
            max_length=_bucket(width + max_new_tokens + 2 * (k + 1)),
            num_top_logprobs=num_top_logprobs,
            num_speculative_tokens=k,
            pad_id=pad_id,
        )
        stops = [set(stop_token_ids) | set(p.stop_token_ids or ()) for p in params]
        m = max(1, max(len(s) for s in stops))
        stop_ids = np.full((len(rows), m), -1, np.int32)
        for i, s in enumerate(stops):
            stop_ids[i, : len(s)] = sorted(s)
        max_tokens = np.array(
            [min(p.max_tokens or max_new_tokens, max_new_tokens) for p in params], np.int32
        )
        max_tokens[real:] = 0
        sampling = SamplingBatch.from_params(params, v, default_seed=default_seed)
        with self._rules():
            ids_d, lengths_d = self._put(ids), self._put(lengths)
            req = Requests(
                sampling=jax.tree.map(self._put, sampling),
                in_prompt=self._put(_prompt_mask(rows, v)),
                stop_ids=self._put(stop_ids),
                max_tokens=self._put(max_tokens),
                forced=self._put(np.full((len(rows), 1), -1, np.int32)),
                budget=self._put(np.full((len(rows), 2), -1, np.int32)),
                allowed=self._put(all_allowed(len(rows), v)),
            )
            if vision is not None:
                vision = jax.tree.map(self._replicate, vision)
            state = _prefill(self.graphdef, self.params, ids_d, lengths_d, req, vision, opts=opts)
        return state, req, opts

    def _replicate(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.device_put(x, replicated)

    def step(self, state: DecodeState, req: Requests, opts: Options, limit: int) -> DecodeState:
        """Run the decode loop until `limit` iterations in total (or all rows are done).

        The state's buffers are donated: use the returned state, never the one passed in.
        """
        with self._rules():
            return _decode(self.graphdef, self.params, state, req, jnp.int32(limit), opts=opts)

    def finish(self, state: DecodeState, opts: Options) -> Generation:
        n = opts.max_new_tokens
        rows = np.asarray(state.real)
        get = lambda x: np.asarray(x)[rows]
        top = None
        if opts.num_top_logprobs:
            top = (get(state.top_ids)[:, :n], get(state.top_logprobs)[:, :n])
        return Generation(
            tokens=get(state.tokens)[:, :n],
            lengths=np.minimum(get(state.num_out), n),
            finish_reasons=["stop" if x else "length" for x in get(state.stopped)],
            logprobs=get(state.logprobs)[:, :n],
            top_logprobs=top,
            drafted=int(get(state.drafted).sum()),
            accepted=int(get(state.accepted).sum()),
        )

    def decode(
        self,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        *,
        max_new_tokens: int,
        **kwargs,
    ) -> Generation:
        """Generate for every prompt; the whole decode loop runs on device in one call."""
        state, req, opts = self.start(prompts, params, max_new_tokens=max_new_tokens, **kwargs)
        return self.finish(self.step(state, req, opts, max_new_tokens), opts)


def generate(
    model: Qwen35,
    input_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: dict[int, float] | None = None,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    pad_id: int = 0,
    speculative: str | None = None,
    num_speculative_tokens: int = 2,
    mesh=None,
    rules=None,
    pixel_values: Any = None,
    image_grid_thw: Any = None,
    pixel_values_videos: Any = None,
    video_grid_thw: Any = None,
) -> np.ndarray:
    """New token ids `[B, max_new_tokens]` (numpy) for `input_ids` (`[B, T]` or a list of id
    lists of any lengths); after a row's stop token the positions hold `pad_id`.

    Images and videos (a `Qwen35VL` model) come as transformers' processor outputs:
    `pixel_values [N, C·Tp·P·P]` with `image_grid_thw [n, 3]` for the image pad runs of
    `input_ids` in row order, and `pixel_values_videos` / `video_grid_thw` for the video ones.

    Sampling options follow the OpenAI Chat Completions names (`temperature=0` is greedy);
    `speculative="mtp"` drafts `num_speculative_tokens` tokens per step with the MTP head (greedy
    output is unchanged; sampled output keeps the target distribution). For per-request options,
    logprobs and acceptance rates, use `Engine.decode`.
    """
    if speculative not in (None, "mtp"):
        raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty,
        logit_bias=logit_bias,
        seed=seed,
    )
    vision = VisionInputs(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    vision = None if all(x is None for x in vision.kwargs().values()) else vision
    rows = _as_rows(input_ids)
    engine = Engine(model, mesh=mesh, rules=rules)
    out = engine.decode(
        rows,
        [params] * len(rows),
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids,
        pad_id=pad_id,
        num_speculative_tokens=num_speculative_tokens if speculative else 0,
        vision=vision,
    )
    return out.tokens
