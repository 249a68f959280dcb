"""Continuous batching: a fixed set of decode slots on the device, requests come and go.

Every slot is one row of the engine's `DecodeState` (KV cache row, GDN conv/recurrent state row,
output buffer, sampling options). A background thread runs the device loop:

    admit      waiting requests take free slots (their row is reset, their options written)
    prefill    one chunk of one prefilling request (chunks of `prefill_chunk` tokens, so a long
               prompt never stalls the running streams for long); its last chunk samples the
               first token
    decode     one step for every decoding slot (the engine's jitted step, MTP speculation if on)
    publish    new tokens of each slot go to its request's event stream

The publish reads what the device had made before the decode step was queued, and runs while
that step computes: the host's work per step (events, finished slots, the next dispatch)
overlaps the device's instead of adding to it. Finished rows are already `done` on the device,
so the step queued behind them skips them.

Constrained requests (`response_format`) carry a host-side `Constraint` (a grammar matcher). Its
allowed-token bitmask is a row of `Requests.allowed`, rewritten after every token it takes; so
while any constrained request holds a slot, every step is a plain one-token step (MTP speculation
pauses: a draft would need the mask of tokens not yet sampled), and a constrained slot whose
prefill samples its first token publishes it before the decode step samples the next.

A request with images or videos (`VisionInputs`) runs the vision tower once, at its first
prefill chunk, which also lays out the whole prompt's embeddings and mRoPE positions
(`vision_prompt`); each chunk then takes its slice of them, so chunk boundaries may fall inside
an image. The prompt's rope delta goes into the slot's cache row, so decoding (plain or MTP)
continues at slot + delta; admission resets it to 0, the delta of text.

Prefix reuse: a slot still holds what its last request left in the cache, and a new prompt
that starts with it prefills only the rest. A Gated DeltaNet state cannot be cut back to an
earlier position, so a slot offers three exact points: `live`, the row as its request ended
(the prompt and reply: a tool loop or a chat without reasoning re-sends them verbatim);
`snapshot`, a copy of its GDN states taken where the prompt's last `boundary_token`
(`<|im_start|>`: the generation prompt) begins, so that the next turn reuses the whole history
before the last reply even when the template re-renders that reply differently (Qwen3.6 drops
earlier turns' reasoning); and `system`, a second copy taken at the prompt's first boundary
token after its start, where the system message (with the tools) ends, if that is at least a
prefill chunk in (else an extra prefill call costs more than it saves). Attention K/V need no
copy for reuse in place: they are written by position, and a request writes only past the
point it reuses. A point counts only if the prompt also has the token that followed it, since
the MTP cache's entry there pairs with that token. Admission takes the free slot with the
longest reusable prefix; a snapshot held by a busy slot that covers more is copied (its GDN
states, its K/V row and both its snapshots) into the slot free the longest, so conversations
that share a system prompt share its prefill across slots. A request looks for a copy again
before its first prefill chunk: prefills run one at a time, oldest first, so of requests that
arrive together, the later ones find the first one's snapshots by then.

Finished and cancelled requests free their slot at once. Shapes never depend on the requests
(prefill chunks are bucketed to powers of two, and so are a vision prompt's patches and width),
so nothing recompiles while serving once each bucket has been seen. A row's
computation does not depend on the other rows, so greedy output equals offline `generate`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.inference.engine import (
    DecodeState,
    Options,
    Requests,
    StaticGraph,
    _constrain_cache,
    _decode,
    _emit,
    _host,
    _model,
    _sample,
    all_allowed,
    check_vision,
    empty_state,
    traced_under_pins,
)
from qwenjax.inference.sampling import SamplingBatch, SamplingParams, top_logprobs
from qwenjax.model import Qwen35
from qwenjax.model.cache import Cache, DeltaNetCache, KVCache, init_cache, logical_axes
from qwenjax.serve import vision_prompt
from qwenjax.vision.model import VisionInputs

MAX_STOP_IDS = 16  # stop token ids per request (EOS ids included)
MAX_FORCED = 512  # length of the forced-token test hook
MAX_TOP_LOGPROBS = 20

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its limit (the HTTP layer answers 429 / 529)."""


class Constraint(Protocol):
    """A request's grammar on the host (`qwenjax.serve.grammar.JsonConstraint`), one token at a
    time: `fill` the allowed tokens of the next one, `advance` by the token sampled."""

    finished: bool  # the grammar is complete: the reply ends here ("stop")
    error: str | None  # it rejected a token (only a forced one can be): the reply is aborted

    def fill(self, out: np.ndarray) -> None:
        """Write the packed bitmask of the next token's allowed ids into `out [1, W]` int32."""

    def advance(self, token: int) -> None: ...


@dataclasses.dataclass
class Event:
    """One increment of a request's output."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str | None  # None while running; "stop", "length" or "abort" at the end
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from the cache, not prefilled


class Handle:
    """A submitted request: iterate its events (sync or async); `cancel()` frees its slot."""

    def __init__(
        self, request_id: str, scheduler: Scheduler, loop: asyncio.AbstractEventLoop | None
    ):
        self.id = request_id
        self._scheduler = scheduler
        self._loop = loop
        self._sync: queue.Queue[Event] = queue.Queue()
        self._async: asyncio.Queue[Event] | None = asyncio.Queue() if loop else None
        self.cancelled = False
        self.finished = False

    def _put(self, event: Event) -> None:
        if self._async is not None and self._loop is not None:
            # RuntimeError: the client's loop is gone, so nobody is listening.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._async.put_nowait, event)
        else:
            self._sync.put(event)

    def cancel(self) -> None:
        if not self.finished:
            self.cancelled = True
            self._scheduler._wake()

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._sync.get()
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        if self._async is None:
            raise RuntimeError("submitted outside an event loop: iterate it with a plain for loop")
        while True:
            event = await self._async.get()
            yield event
            if event.finish_reason is not None:
                return


@dataclasses.dataclass
class _Slot:
    handle: Handle
    prompt: list[int]
    params: SamplingParams
    prefilled: int = 0  # prompt tokens already in the cache
    delivered: int = 0  # output tokens already published
    started: float = 0.0
    forced: list[int] = dataclasses.field(default_factory=list)  # the test hook's script
    budget: tuple[int, int] | None = None  # (end-of-reasoning token, reasoning token budget)
    drafted: int = 0  # speculation totals already counted
    accepted: int = 0
    constraint: Constraint | None = None
    vision: VisionInputs | None = None  # the prompt's images and videos, until prefilled
    prepared: vision_prompt.PromptVision | None = None  # their tower output, during prefill
    multimodal: bool = False
    cached: int = 0  # prompt tokens reused from the slot's cache (not prefilled)
    # Snapshot points: once the prompt is prefilled this far, the slot's snapshot of that name
    snapshot_at: dict[int, str] = dataclasses.field(default_factory=dict)
    outputs: list[int] = dataclasses.field(default_factory=list)  # published tokens


@dataclasses.dataclass
class _Kept:
    """What a slot's cache still holds: the tokens before each reusable point, plus the token
    that followed it (see the module docstring)."""

    live: list[int] | None = None  # the row as its request ended: L processed tokens, then 1
    # The snapshots' b tokens, then 1: at the prompt's first boundary after its start (the end
    # of the system message) and at its last (the generation prompt).
    system: list[int] | None = None
    snapshot: list[int] | None = None

    def reuse(self, prompt: list[int], copy: bool = False) -> tuple[int, str]:
        """(tokens of `prompt` the slot holds, "live" | "system" | "snapshot"), or (0, "reset");
        `copy`: only what another slot can copy (the snapshots: a live row is never copied)."""
        best = (0, "reset")
        kinds = (("system", self.system), ("snapshot", self.snapshot))
        for mode, kept in kinds if copy else (*kinds, ("live", self.live)):
            n = 0 if kept is None else len(kept)
            # The last token first: most records differ there, and a long comparison runs on
            # the loop thread, between steps of every stream.
            if (
                n > 1 + best[0]
                and len(prompt) >= n
                and prompt[n - 1] == kept[-1]
                and prompt[:n] == kept
            ):
                best = (n - 1, mode)
        return best

    def keep_only(self, keep: int) -> None:
        """The row is rewritten from slot `keep` on: forget the points past it."""
        self.live = None
        if self.system is not None and len(self.system) - 1 > keep:
            self.system = None
        if self.snapshot is not None and len(self.snapshot) - 1 > keep:
            self.snapshot = None


# ------------------------------------------------------------------------------ device functions
def _take(x: jax.Array, slot: jax.Array, axis: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=axis)


def _put(x: jax.Array, row: jax.Array, slot: jax.Array, axis: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, row.astype(x.dtype), slot, axis=axis)


# The cache's rows and the snapshots' are split over the mesh's batch axes: `ax.take_row` and
# `ax.put_row` move one row where a dynamic slice would gather the whole cache onto each device.
def _cache_row(cache: Cache, slot) -> Cache:
    """The batch-1 cache of one slot (blocks are `[NB, B, ...]`, the rest `[B, ...]`)."""
    names = logical_axes(cache)
    take = lambda axis: lambda x, n: ax.take_row(x, slot, n, axis)
    return Cache(
        blocks=jax.tree.map(take(1), cache.blocks, names.blocks),
        mtp=jax.tree.map(take(0), cache.mtp, names.mtp),
        length=_take(cache.length, slot, 0),
        rope_delta=_take(cache.rope_delta, slot, 0),
    )


def _set_cache_row(cache: Cache, slot, row: Cache) -> Cache:
    names = logical_axes(cache)
    put = lambda axis: lambda x, r, n: ax.put_row(x, r, slot, n, axis)
    return Cache(
        blocks=jax.tree.map(put(1), cache.blocks, row.blocks, names.blocks),
        mtp=jax.tree.map(put(0), cache.mtp, row.mtp, names.mtp),
        length=_put(cache.length, row.length, slot, 0),
        rope_delta=_put(cache.rope_delta, row.rope_delta, slot, 0),
    )


def _empty_row(row: Cache) -> Cache:
    """A slot's cache as if new: zero states, length and rope delta (stale KV entries are never
    read)."""
    blocks = tuple(
        layer
        if isinstance(layer, KVCache)
        else DeltaNetCache(conv=jnp.zeros_like(layer.conv), state=jnp.zeros_like(layer.state))
        for layer in row.blocks
    )
    zero = jnp.zeros_like
    return Cache(
        blocks=blocks, mtp=row.mtp, length=zero(row.length), rope_delta=zero(row.rope_delta)
    )


def _gdn_only(blocks: tuple) -> tuple:
    """The GDN layers of a cache's blocks (None in place of each attention layer)."""
    return tuple(layer if isinstance(layer, DeltaNetCache) else None for layer in blocks)


def _constrained_snapshot(snap: tuple, cache: Cache) -> tuple:
    axes = _gdn_only(logical_axes(cache).blocks)
    return jax.tree.map(ax.constrain, snap, axes)


def _restored(row: Cache, snap: tuple, slot) -> Cache:
    """`row` with its GDN states from slot `slot` of the snapshot stacks."""
    names = _gdn_only(logical_axes(row).blocks)
    take = lambda x, n: ax.take_row(x, slot, n, 1)
    blocks = tuple(
        layer if kept is None else jax.tree.map(take, kept, n)
        for layer, kept, n in zip(row.blocks, snap, names, strict=True)
    )
    return dataclasses.replace(row, blocks=blocks)


def _copy_snapshot(snap: tuple, names: tuple, slot, source) -> tuple:
    """Slot `source`'s entry of the snapshot stacks copied into slot `slot`'s."""
    copy = lambda x, n: ax.put_row(x, ax.take_row(x, source, n, 1), slot, n, 1)
    return jax.tree.map(copy, snap, names)


@functools.partial(
    jax.jit, static_argnames=("mode", "point"), donate_argnames=("s", "req", "snaps")
)
def _admit(
    s: DecodeState,
    req: Requests,
    snaps: dict[str, tuple] | None,
    slot,
    source,
    row_req: Requests,
    keep,
    *,
    mode: str,
    point: str | None,
) -> tuple[DecodeState, Requests, dict[str, tuple] | None]:
    """Give slot `slot` a new request's options; its cache row holds the first `keep` tokens of
    the prompt: none ("reset"), the row as it is ("live"), the row's snapshot `snaps[point]`
    ("snapshot"), or slot `source`'s snapshot and K/V ("copy": its snapshots become the slot's
    too)."""
    req = jax.tree.map(lambda x, r: _put(x, r, slot, 0), req, row_req)
    row = _cache_row(s.cache, slot)
    if mode == "reset":
        row = _empty_row(row)
    elif mode == "snapshot":
        row = _restored(row, snaps[point], slot)
    elif mode == "copy":
        # Its K/V past `keep` are stale but never read (the request writes them first).
        row = _restored(_cache_row(s.cache, source), snaps[point], source)
        names = _gdn_only(logical_axes(s.cache).blocks)
        snaps = {k: _copy_snapshot(snap, names, slot, source) for k, snap in snaps.items()}
        snaps = {name: _constrained_snapshot(snap, s.cache) for name, snap in snaps.items()}
    row = dataclasses.replace(
        row, length=jnp.full_like(row.length, keep), rope_delta=jnp.zeros_like(row.rope_delta)
    )
    cache = _set_cache_row(s.cache, slot, row)
    zero = lambda x: _put(x, jnp.zeros_like(_take(x, slot, 0)), slot, 0)
    s = dataclasses.replace(
        s,
        cache=cache,
        num_out=zero(s.num_out),
        # Done until its prefill samples the first token: the decode step must skip the row.
        done=_put(s.done, jnp.ones((1,), bool), slot, 0),
        stopped=zero(s.stopped),
        counts=zero(s.counts),
        drafted=zero(s.drafted),
        accepted=zero(s.accepted),
        real=_put(s.real, jnp.ones((1,), bool), slot, 0),
    )
    return s, req, snaps


@functools.partial(jax.jit, donate_argnames=("snap",))
def _snapshot(snap: tuple, s: DecodeState, slot) -> tuple:
    """Copy slot `slot`'s GDN states (conv and recurrent) into the snapshot stacks."""
    live = _gdn_only(s.cache.blocks)
    names = _gdn_only(logical_axes(s.cache).blocks)
    copy = lambda buf, x, n: ax.put_row(buf, ax.take_row(x, slot, n, 1), slot, n, 1)
    snap = jax.tree.map(copy, snap, live, names)
    return _constrained_snapshot(snap, s.cache)


@functools.partial(jax.jit, donate_argnames=("s",))
def _release(s: DecodeState, slot) -> DecodeState:
    """Stop slot `slot` (finished or cancelled): the decode step skips done rows."""
    return dataclasses.replace(
        s,
        done=_put(s.done, jnp.ones((1,), bool), slot, 0),
        real=_put(s.real, jnp.zeros((1,), bool), slot, 0),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "opts", "last"), donate_argnames=("s",))
@traced_under_pins
def _prefill_chunk(
    graphdef,
    params,
    s: DecodeState,
    req: Requests,
    slot,
    ids,
    num_valid,
    next_ids,
    vision: tuple[jax.Array, jax.Array, jax.Array] | None,
    *,
    opts,
    last,
) -> DecodeState:
    """Extend slot `slot` by `ids [1, C]` (first `num_valid` real); the last chunk samples.

    `vision` (a prompt with images or videos): the chunk's input embeddings `[1, C, D]`, its
    mRoPE positions `[3, 1, C]` and the prompt's rope delta `[1]`, which the row keeps for
    decoding (`vision_prompt`); None: text, at the row's slots.
    """
    model = _model(graphdef, params)
    row = _cache_row(s.cache, slot)
    # The rows move under the server's rules; one request's work leaves the batch whole.
    with ax.one_row():
        start = row.length
        positions = None  # the MTP head's: the slots, unless multimodal
        if vision is None:
            hidden, row, _ = model.extend(ids, row, num_valid[None])  # [1, C, D]
        else:
            embeds, positions, delta = vision
            ctx = model.cache_context(ids, start, num_valid[None], positions)
            hidden, row, _ = model.extend_embedded(embeds, ctx, row)
            row = dataclasses.replace(row, rope_delta=delta)
        at = (num_valid - 1)[None, None, None]
        spec = opts.num_speculative_tokens > 0
        if last:
            h = jnp.take_along_axis(hidden, at, axis=1)  # [1, 1, D]
            logits = model.logits(h)[:, 0].astype(jnp.float32)  # [1, V]
            take = lambda x: _take(x, slot, 0)
            # The slot's row alone, for the decode step's own sampling (options, forcing, budget);
            # `_sample` reads only these fields of the state.
            row_state = dataclasses.replace(s, num_out=take(s.num_out), counts=take(s.counts))
            tok, lp = _sample(logits, row_state, jax.tree.map(take, req))
            top = top_logprobs(logits, opts.num_top_logprobs)
            b = s.num_out.shape[0]
            mine = jnp.arange(b) == slot
            s = dataclasses.replace(s, done=s.done & ~mine)
            spread = lambda x: jnp.zeros((b, *x.shape[1:]), x.dtype).at[slot].set(x[0])
            s = _emit(
                s,
                req,
                spread(tok)[:, None],
                mine.astype(jnp.int32),
                spread(lp)[:, None],
                (spread(top[0])[:, None], spread(top[1])[:, None]),
                opts,
            )
            if spec:
                t = jnp.arange(ids.shape[1])[None, :]
                next_ids = jnp.where(t == num_valid - 1, tok[:, None], next_ids)
        if spec:
            m, mtp = model.mtp_extend(hidden, next_ids, row.mtp, start, positions)
            row = dataclasses.replace(row, mtp=mtp)
            if last:
                drafter = jnp.take_along_axis(m, at, axis=1)[:, 0]
                s = dataclasses.replace(s, draft_hidden=_put(s.draft_hidden, drafter, slot, 0))
    return dataclasses.replace(s, cache=_set_cache_row(s.cache, slot, row))


@functools.partial(jax.jit, static_argnames=("width",))
def _read(s: DecodeState, cursor, *, width: int):
    """Each slot's outputs from `cursor[b]` on: tokens, logprobs and top logprobs `[B, width]`."""
    take = lambda x: jax.vmap(lambda r, c: jax.lax.dynamic_slice_in_dim(r, c, width, 0))(x, cursor)
    return (
        s.num_out,
        s.done,
        s.stopped,
        take(s.tokens),
        take(s.logprobs),
        take(s.top_ids),
        take(s.top_logprobs),
        s.drafted,
        s.accepted,
        s.cache.length,
    )


def _committed(tree):
    """`tree` committed to the devices and shardings it has (a jit's outputs may be left
    uncommitted, and an uncommitted input makes the next jit compile once more)."""
    return jax.device_put(tree, jax.tree.map(lambda x: x.sharding, tree))


def _last_index(tokens: list[int], token: int) -> int:
    """Where the last `token` in `tokens` is (0 if none)."""
    try:
        return len(tokens) - 1 - tokens[::-1].index(token)
    except ValueError:
        return 0


def _snapshot_points(
    prompt: list[int], boundary: int, keep: int, min_system: int = 0
) -> dict[int, str]:
    """Where a prompt's prefill takes snapshots, past `keep`: at its first `boundary` token
    after its start ("system": the system message ends there, so every conversation with the
    same system prompt and tools shares it), if that is `min_system` tokens in, and at its last
    ("snapshot": the generation prompt)."""
    last = _last_index(prompt, boundary)
    try:
        first = prompt.index(boundary, 1)
    except ValueError:
        first = 0
    if first < min_system:  # a prefill call more would cost more than the tokens it saves
        first = 0
    points = {first: "system", last: "snapshot"}  # one point: the last
    return {at: name for at, name in points.items() if at > keep}


def serving_options(max_length: int, prefill_chunk: int, k: int, pad_id: int) -> Options:
    """The engine options of a scheduler with this context, chunk and speculation."""
    # Prefill writes whole (padded) chunks and verification k+1 slots past the length.
    chunked = -(-max_length // prefill_chunk) * prefill_chunk
    return Options(
        max_new_tokens=max_length,
        max_length=chunked + 2 * (k + 1),
        num_top_logprobs=MAX_TOP_LOGPROBS,
        num_speculative_tokens=k,
        pad_id=pad_id,
    )


def idle_requests(slots: int, vocab: int, allowed: np.ndarray) -> Requests:
    """Every slot's options before any request (greedy, nothing forced, every token allowed)."""
    idle = SamplingBatch.from_params(
        [SamplingParams(temperature=0.0)] * slots, vocab, default_seed=0
    )
    return Requests(
        sampling=idle,
        in_prompt=jnp.zeros((slots, vocab), bool),
        stop_ids=jnp.full((slots, MAX_STOP_IDS), -1, jnp.int32),
        max_tokens=jnp.zeros((slots,), jnp.int32),
        forced=jnp.full((slots, MAX_FORCED), -1, jnp.int32),
        budget=jnp.full((slots, 2), -1, jnp.int32),
        allowed=jnp.asarray(allowed),
    )


def fresh_state(config, slots: int, opts: Options, dtype) -> DecodeState:
    """The scheduler's decode state before any request, cache and all (to trace, under the
    mesh rules: `benchmarks/serve_hlo.py` compiles the row functions for a TPU from it)."""
    spec = opts.num_speculative_tokens > 0
    cache = init_cache(config, slots, opts.max_length, dtype, mtp=spec)
    # Every row's rope delta: 0 for text (positions = slots), set by a vision prefill.
    cache = dataclasses.replace(cache, rope_delta=jnp.zeros((slots,), jnp.int32))
    # Born sharded as the steps keep it: replicated, every device held the whole cache until
    # the first step.
    cache = _constrain_cache(cache)
    width = opts.max_new_tokens + opts.num_speculative_tokens + 1
    d = config.hidden_size if spec else 0
    idle = jnp.zeros((slots,), bool)
    return empty_state(
        cache, width, MAX_TOP_LOGPROBS, config.vocab_size, d, dtype, opts.pad_id, real=idle
    )


def _bucket(n: int, limit: int) -> int:
    return min(limit, max(16, 1 << (n - 1).bit_length()))


# ------------------------------------------------------------------------------------ scheduler
class Scheduler:
    """Serve a model to many concurrent requests (see the module docstring)."""

    def __init__(
        self,
        model: Qwen35,
        *,
        slots: int = 8,
        max_length: int = 4096,
        prefill_chunk: int = 256,
        num_speculative_tokens: int = 0,
        max_waiting: int = 256,
        stop_token_ids: Sequence[int] = (),
        pad_id: int = 0,
        mesh=None,
        rules=None,
        prefix_cache: bool = True,
        boundary_token: int | None = None,
    ):
        """`prefix_cache`: reuse what a free slot's cache holds (see the module docstring);
        `boundary_token`: the prompt's last one of these is where each slot's snapshot is taken
        (the server passes `<|im_start|>`); None: no snapshots (no memory for them), only
        the live rows are reused."""
        if slots < 1 or max_length < 32 or prefill_chunk < 16:
            raise ValueError(
                f"need slots ≥ 1, max_length ≥ 32, prefill_chunk ≥ 16; got {slots}, "
                f"{max_length}, {prefill_chunk}"
            )
        if num_speculative_tokens and model.mtp is None:
            raise ValueError("speculative decoding needs a model with an MTP head")
        split = ax.batch_split(mesh, rules)
        if slots % split:
            raise ValueError(
                f"slots ({slots}) must be a multiple of {split}: the mesh splits the batch over "
                f"{split} devices (its data and fsdp axes under these rules)"
            )
        if max_length > model.config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the model's max_position_embeddings "
                f"{model.config.max_position_embeddings}"
            )
        self.model = model
        self.config = model.config
        graphdef, self.params = nnx.split(model)
        self.graphdef = StaticGraph(graphdef)
        self.slots = slots
        self.max_length = max_length
        self.prefill_chunk = 1 << (prefill_chunk.bit_length() - 1)  # a power of two
        self.k = num_speculative_tokens
        self.max_waiting = max_waiting
        self.stop_token_ids = tuple(stop_token_ids)
        self.pad_id = pad_id
        self.mesh, self.rules = mesh, rules
        self.opts = serving_options(max_length, self.prefill_chunk, self.k, pad_id)
        if mesh is None:
            self._where = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        else:  # the requests' options (small), replicated; the cache is born sharded
            self._where = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        # The host copy of `Requests.allowed`; `_dirty`: it changed since the last upload.
        self._allowed = all_allowed(slots, self.config.vocab_size)
        self._dirty = False
        self.prefix_cache = prefix_cache
        self.boundary_token = boundary_token if prefix_cache else None
        self._state, self._req = self._init_device()
        # Two GDN states per slot (the snapshots at the system and the last point), shaped and
        # sharded like the cache's GDN layers.
        self._snaps: dict[str, tuple] | None = None
        if self.boundary_token is not None:
            zeros = lambda c: _constrained_snapshot(
                jax.tree.map(jnp.zeros_like, _gdn_only(c.blocks)), c
            )
            with self._rules():
                self._snaps = _committed(
                    {name: jax.jit(zeros)(self._state.cache) for name in ("system", "snapshot")}
                )
            size = sum(x.nbytes for x in jax.tree.leaves(self._snaps))
            logger.info(
                "prefix cache: 2 x %d slot snapshots of the GDN states, %.1f MiB",
                slots,
                size / 2**20,
            )
        self._kept = [_Kept() for _ in range(slots)]
        self._free = collections.deque(range(slots))
        self._active: dict[int, _Slot] = {}
        self._waiting: collections.deque[_Slot] = collections.deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._running = False
        self._ids = itertools.count()
        self._error: BaseException | None = None
        # Every key from the start: `stats()` copies them from another thread, and a key added
        # meanwhile would break its iteration.
        keys = ["prompt_tokens_total", "generation_tokens_total", "rejected"]
        keys += ["prefix_cache_queries_total", "prefix_cache_hits_total"]
        keys += [f"finished_{reason}" for reason in ("stop", "length", "abort")]
        if self.k:
            keys += [
                f"spec_decode_num_{x}_total" for x in ("drafts", "draft_tokens", "accepted_tokens")
            ]
        self.counters = collections.Counter(dict.fromkeys(keys, 0))

    # -------------------------------------------------------------------------------- device
    def _init_device(self) -> tuple[DecodeState, Requests]:
        b = self.slots
        req = idle_requests(b, self.config.vocab_size, self._allowed)
        fresh = jax.jit(functools.partial(fresh_state, self.config, b, self.opts, self.model.dtype))

        # Committed placement from the start, so the first request's jit signatures equal the
        # later ones (an uncommitted input would recompile every function once more).
        with self._rules():
            return _committed(fresh()), jax.device_put(req, self._where)

    def _rules(self):
        """The mesh rules (a single request's work inside narrows them with `ax.one_row`)."""
        if self.mesh is None:
            return contextlib.nullcontext()
        return ax.use_rules(self.mesh, self.rules or ax.RULES["fsdp"])

    def _row_request(self, index: int, slot: _Slot) -> Requests:
        p, v = slot.params, self.config.vocab_size
        allowed = self._allowed[index : index + 1]
        allowed[:] = -1
        if slot.constraint is not None:
            slot.constraint.fill(allowed)
        stops = list(
            dict.fromkeys([*(() if p.ignore_eos else self.stop_token_ids), *p.stop_token_ids])
        )
        stop_ids = np.full((1, MAX_STOP_IDS), -1, np.int32)
        stop_ids[0, : len(stops)] = stops
        in_prompt = np.zeros((1, v), bool)
        in_prompt[0, slot.prompt] = True
        forced = np.full((1, MAX_FORCED), -1, np.int32)
        forced[0, : len(slot.forced)] = slot.forced
        return Requests(
            sampling=SamplingBatch.from_params([p], v),
            in_prompt=jnp.asarray(in_prompt),
            stop_ids=jnp.asarray(stop_ids),
            max_tokens=jnp.asarray([self._max_tokens(p, len(slot.prompt))], jnp.int32),
            forced=jnp.asarray(forced),
            budget=jnp.asarray([slot.budget or (-1, -1)], jnp.int32),
            allowed=jnp.asarray(allowed),
        )

    def _max_tokens(self, p: SamplingParams, prompt_len: int) -> int:
        room = self.max_length - prompt_len
        return room if p.max_tokens is None else min(p.max_tokens, room)

    # ------------------------------------------------------------------------------ requests
    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        forced_tokens: Sequence[int] | None = None,
        reasoning_budget: tuple[int, int] | None = None,
        constraint: Constraint | None = None,
        vision: VisionInputs | None = None,
    ) -> Handle:
        """Queue a request; returns its handle at once (events follow as tokens are made).

        `vision`: the images and videos of the prompt's pad runs, as `chat_inputs` returns them
        (the model must have a vision tower).

        `reasoning_budget=(end_token, n)`: if the reply has not produced `end_token` (`</think>`)
        within its first n tokens, that token is forced next (Anthropic's `budget_tokens`).
        `constraint`: each token is sampled among those it allows (see the module docstring).
        `forced_tokens` is a test hook: output token i is `forced_tokens[i]`.

        Raises:
          ValueError: an empty or too long prompt, ids outside the vocabulary, bad options,
            vision inputs that do not match the prompt or a model without a vision tower.
          QueueFull: `max_waiting` requests are already waiting.
        """
        prompt = [int(t) for t in prompt_ids]
        v = self.config.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < v for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {v})")
        params.validate(v)
        if len(params.stop_token_ids or ()) + len(self.stop_token_ids) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS - len(self.stop_token_ids)} stop_token_ids")
        need = len(prompt) + (params.max_tokens or 1)
        if need > self.max_length:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens or 1}) "
                f"exceeds the server's context of {self.max_length} tokens"
            )
        if forced_tokens is not None and len(forced_tokens) > MAX_FORCED:
            raise ValueError(f"at most {MAX_FORCED} forced tokens")
        if vision is not None:
            check_vision(self.model, np.asarray([prompt]), vision)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = Handle(f"req-{next(self._ids)}", self, loop)
        slot = _Slot(
            handle=handle,
            prompt=prompt,
            params=params,
            started=time.perf_counter(),
            forced=list(forced_tokens or []),
            budget=None if reasoning_budget is None else tuple(map(int, reasoning_budget)),
            constraint=constraint,
            vision=vision,
            multimodal=vision is not None,
        )
        with self._lock:
            if self._error is not None:
                raise RuntimeError(f"the scheduler stopped after an error: {self._error}")
            # Requests about to take a free slot are not waiting for one.
            queued = len(self._waiting) - len(self._free)
            if queued >= self.max_waiting:
                self.counters["rejected"] += 1
                raise QueueFull(f"{queued} requests are waiting (limit {self.max_waiting})")
            self._waiting.append(slot)
            self.counters["prompt_tokens_total"] += len(prompt)
            self._work.notify()
        return handle

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "slots": self.slots,
                "slots_used": len(self._active),
                "running": len(self._active),
                "waiting": len(self._waiting),
                **self.counters,
            }

    # --------------------------------------------------------------------------------- loop
    def start(self) -> None:
        if self._thread is not None and self._running:
            return
        if self._thread is not None:  # a stop that timed out: its loop ends after its step
            self._thread.join()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="qwenjax-scheduler", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop the loop; with `drain`, running and waiting requests finish first (up to
        `timeout` seconds), the rest end with finish_reason "abort"."""
        deadline = time.monotonic() + timeout
        while drain and time.monotonic() < deadline:
            with self._lock:
                if not self._active and not self._waiting:
                    break
            time.sleep(0.05)
        with self._lock:
            self._running = False
            self._work.notify()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            # A loop still in a device call keeps its thread and its requests, which it aborts
            # when it ends (`start` waits for that): two loops would run the same donated state.
            if self._thread.is_alive():
                logger.warning(
                    "the engine loop did not stop within %g s; it ends after its current step",
                    timeout,
                )
                return
            self._thread = None
        self._abort_all()

    def _abort_all(self) -> None:
        with self._lock:  # `submit` appends to the queue from other threads
            waiting = list(self._waiting)
            self._waiting.clear()
        for slot in [*self._active.values(), *waiting]:
            self._finish(slot, "abort")
        for index in self._active:  # their slots are free again, for a later `start`
            self._kept[index] = _Kept()
            if self._error is None:  # else the device state may be gone: admission resets it
                self._state = _release(self._state, jnp.int32(index))
        with self._lock:
            self._free.extend(self._active)
            self._active.clear()

    def _wake(self) -> None:
        with self._lock:
            self._work.notify()

    @property
    def healthy(self) -> bool:
        """The device loop is running (False after an error or before `start`)."""
        return (
            self._error is None
            and self._running
            and self._thread is not None
            and self._thread.is_alive()
        )

    @property
    def error(self) -> BaseException | None:
        return self._error

    def _loop(self) -> None:
        try:
            with self._rules():
                self._serve()
        except BaseException as e:  # surface device errors to every waiting client
            self._error = e
            self._abort_all()
            raise
        self._abort_all()  # stopped: what `stop` left running or waiting ends here

    def _serve(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._has_work():
                    self._work.wait(timeout=1.0)
                if not self._running:
                    return
            self._cancel_requested()
            self._admit()
            self._step()

    def _has_work(self) -> bool:
        return bool(self._active) or (bool(self._waiting) and bool(self._free))

    def _cancel_requested(self) -> None:
        with self._lock:
            waiting = [s for s in self._waiting if s.handle.cancelled]
            for s in waiting:
                self._waiting.remove(s)
        for s in waiting:
            self._finish(s, "abort")
        for index, s in list(self._active.items()):
            if s.handle.cancelled:
                self._free_slot(index, "abort")

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._free or not self._waiting:
                    return
                slot, free, busy = self._waiting.popleft(), list(self._free), list(self._active)
            # Outside the lock (this thread alone changes `_free`): comparing long prompts with
            # every slot's tokens must not hold up `submit`.
            index, source, keep, mode = self._pick(slot, free, busy)
            with self._lock:
                self._free.remove(index)
                self._active[index] = slot
            self.counters["prefix_cache_queries_total"] += len(slot.prompt)
            self._assign(index, slot, source, keep, mode)

    def _assign(self, index: int, slot: _Slot, source: int, keep: int, mode: str) -> None:
        """Write slot `index`'s row for `slot`'s request, its cache holding the prompt's first
        `keep` tokens as `_pick` found them (in `source`, for a copy)."""
        point = None
        if mode in ("system", "snapshot"):  # the slot's own snapshot
            point, mode = mode, "snapshot"
        elif mode.startswith("copy:"):
            point, mode = mode[5:], "copy"
            source_kept = self._kept[source]
            self._kept[index] = _Kept(system=source_kept.system, snapshot=source_kept.snapshot)
        self._kept[index].keep_only(keep)
        self.counters["prefix_cache_hits_total"] += keep - slot.cached
        slot.prefilled = slot.cached = keep
        if self.boundary_token is not None and not slot.multimodal:
            slot.snapshot_at = _snapshot_points(
                slot.prompt, self.boundary_token, keep, min_system=self.prefill_chunk
            )
        self._state, self._req, self._snaps = _admit(
            self._state,
            self._req,
            self._snaps,
            jnp.int32(index),
            jnp.int32(source),
            self._row_request(index, slot),
            jnp.int32(keep),
            mode=mode,
            point=point,
        )

    def _repick(self, index: int) -> None:
        """Before a request's first prefill chunk, copy a snapshot that a busy slot took since
        the request was admitted, if it covers more. Prefills run one at a time, oldest first,
        so of requests that arrive together with one system prompt, the later ones wait for
        the first one's prefill anyway, and then copy its system snapshot."""
        slot = self._active[index]
        if not self.prefix_cache or slot.multimodal or self._snaps is None:
            return
        copy = self._best_copy(slot.prompt, [i for i in self._active if i != index], slot.cached)
        if copy is not None:
            self._assign(index, slot, *copy)

    def _best_copy(
        self, prompt: list[int], sources: list[int], floor: int
    ) -> tuple[int, int, str] | None:
        """(source slot, tokens, "copy:<point>") of the longest snapshot of `prompt` among
        `sources` that covers more than `floor` tokens, or None."""
        best = None
        for source in sources:
            keep, mode = self._kept[source].reuse(prompt, copy=True)
            if keep > floor:
                floor, best = keep, (source, keep, f"copy:{mode}")
        return best

    def _pick(self, slot: _Slot, free: list[int], busy: list[int]) -> tuple[int, int, int, str]:
        """The free slot for `slot`'s request, the slot whose cache it reuses, the tokens it
        reuses and how: the longest reusable prefix of its prompt, held by a free slot itself
        or copied from a busy slot's snapshot into the slot free the longest (slots never used
        come first); else no reuse, in that slot."""
        best = (free[0], free[0], 0, "reset")
        if not self.prefix_cache or slot.multimodal:
            return best
        for index in free:
            keep, mode = self._kept[index].reuse(slot.prompt)
            if keep > best[2]:
                best = (index, index, keep, mode)
        if self._snaps is not None:  # a copy must beat reuse in place
            # Busy slots only (never the target): a free one offers in place what it could copy.
            copy = self._best_copy(slot.prompt, busy, best[2])
            if copy is not None:
                best = (free[0], *copy)
        return best

    def _step(self) -> None:
        prefilling = [i for i, s in self._active.items() if s.prefilled < len(s.prompt)]
        if prefilling:  # one chunk per iteration: running streams keep their pace
            index = min(prefilling, key=lambda i: self._active[i].started)
            slot = self._active[index]
            if slot.prefilled == slot.cached:  # its first chunk
                self._repick(index)
            self._prefill_one(index)
            if slot.constraint is not None and slot.prefilled == len(slot.prompt):
                self._publish()  # its grammar takes the first token before the next is sampled
        self._decode_and_publish()

    def _decoding(self) -> bool:
        """Some slot has its first token out, so a decode step has rows to run."""
        return any(s.prefilled == len(s.prompt) and s.delivered > 0 for s in self._active.values())

    def _decode_and_publish(self) -> None:
        if not self._decoding():
            self._publish()
        elif any(s.constraint is not None for s in self._active.values()):
            # The grammars must see this step's tokens before the next is sampled: one token a
            # step, as the masks allow, published before the next step is queued.
            self._decode_step(plain=self.k > 0)
            self._publish()
        else:
            # Read what the device has made so far, queue the next step behind it, and hand the
            # tokens out while that step runs: the host's work per step overlaps the device's.
            made = self._queue_read()
            self._decode_step(plain=False)
            self._publish(made)

    def _decode_step(self, plain: bool) -> None:
        self._upload_allowed()
        self._state = _decode(
            self.graphdef,
            self.params,
            self._state,
            self._req,
            self._state.steps + 1,
            opts=self.opts,
            plain=plain,
        )

    def _queue_read(self) -> tuple[jax.Array, ...]:
        cursor = np.zeros((self.slots,), np.int32)
        for i, s in self._active.items():
            cursor[i] = s.delivered
        return _read(self._state, jnp.asarray(cursor), width=self.k + 2)

    def _upload_allowed(self) -> None:
        if self._dirty:
            allowed = jax.device_put(self._allowed, self._where)
            self._req = dataclasses.replace(self._req, allowed=allowed)
            self._dirty = False

    def _prefill_one(self, index: int) -> None:
        slot = self._active[index]
        lo = slot.prefilled
        hi = min(len(slot.prompt), lo + self.prefill_chunk)
        # A chunk ends where a snapshot is taken.
        hi = min([hi, *(at for at in slot.snapshot_at if lo < at)])
        n = hi - lo
        width = _bucket(n, self.prefill_chunk)
        ids = np.full((1, width), self.pad_id, np.int32)
        ids[0, :n] = slot.prompt[lo:hi]
        nxt = np.full((1, width), self.pad_id, np.int32)
        following = slot.prompt[lo + 1 : hi + 1]
        nxt[0, : len(following)] = following
        last = hi == len(slot.prompt)
        vision = None
        if slot.vision is not None:
            if slot.prepared is None:  # the first chunk: the tower runs once per prompt
                with self._rules(), ax.one_row():
                    slot.prepared = vision_prompt.prepare(
                        self.graphdef,
                        self.params,
                        self.config.vision,
                        slot.prompt,
                        slot.vision,
                        chunk=self.prefill_chunk,
                        pad_id=self.pad_id,
                    )
            vision = (*slot.prepared.window(lo, width), slot.prepared.delta)
        with self._rules():  # the chunk's own work runs under `ax.one_row`
            self._state = _prefill_chunk(
                self.graphdef,
                self.params,
                self._state,
                self._req,
                jnp.int32(index),
                jnp.asarray(ids),
                jnp.int32(n),
                jnp.asarray(nxt),
                vision,
                opts=self.opts,
                last=last,
            )
        slot.prefilled = hi
        name = slot.snapshot_at.get(hi)
        if name is not None:
            taken = _snapshot(self._snaps[name], self._state, jnp.int32(index))
            self._snaps = {**self._snaps, name: taken}
            setattr(self._kept[index], name, slot.prompt[: hi + 1])
        if last:  # free the pixels and the prompt's embeddings
            slot.vision = slot.prepared = None

    def _publish(self, made: tuple[jax.Array, ...] | None = None) -> None:
        """Publish each slot's new tokens, from `made` (a `_read` queued earlier) or the state
        now; free the slots that finished."""
        made = self._queue_read() if made is None else made
        num_out, done, stopped, tokens, lps, top_ids, top_lps, drafted, accepted, length = map(
            _host, made
        )
        for i, s in list(self._active.items()):
            new = int(num_out[i]) - s.delivered
            finished = bool(done[i]) and s.prefilled == len(s.prompt)
            if new <= 0 and not finished:
                continue
            if new > 0:
                self._emit_event(
                    s, tokens[i, :new], lps[i, :new], top_ids[i, :new], top_lps[i, :new]
                )
                if s.constraint is not None:
                    finished = self._advance(i, s, tokens[i, :new], finished) or finished
            # Speculation counters advance every step (a slot's totals restart at admission).
            grew = int(drafted[i]) - s.drafted
            if grew > 0:
                self.counters["spec_decode_num_drafts_total"] += grew // max(self.k, 1)
                self.counters["spec_decode_num_draft_tokens_total"] += grew
                self.counters["spec_decode_num_accepted_tokens_total"] += (
                    int(accepted[i]) - s.accepted
                )
                s.drafted, s.accepted = int(drafted[i]), int(accepted[i])
            if finished:
                # A row done on the device is final: its length is what the cache holds.
                held = int(length[i]) if done[i] else None
                self._free_slot(i, self._reason(s, bool(stopped[i])), held)

    def _advance(self, index: int, s: _Slot, tokens: np.ndarray, done: bool) -> bool:
        """Feed a constrained slot's new tokens to its grammar and, unless the row is `done`,
        refresh its allowed tokens; True when the grammar ended the reply (complete, or a
        rejected forced token)."""
        c = s.constraint
        for t in tokens:
            c.advance(int(t))
            if c.finished or c.error is not None:
                return True
        if not done:
            c.fill(self._allowed[index : index + 1])
            self._dirty = True
        return False

    @staticmethod
    def _reason(s: _Slot, stopped: bool) -> str:
        c = s.constraint
        if c is not None and c.error is not None:
            return "abort"
        return "stop" if stopped or (c is not None and c.finished) else "length"

    def _emit_event(self, s: _Slot, tokens, lps, top_ids, top_lps, finish: str | None = None):
        p = s.params
        n = len(tokens)
        s.delivered += n
        if self.prefix_cache:
            s.outputs += [int(t) for t in tokens]
        self.counters["generation_tokens_total"] += n
        k = p.top_logprobs or 0
        s.handle._put(
            Event(
                token_ids=[int(t) for t in tokens],
                logprobs=[float(x) for x in lps] if p.logprobs else None,
                top_logprobs=[
                    [(int(a), float(b)) for a, b in zip(ids[:k], vals[:k], strict=True)]
                    for ids, vals in zip(top_ids, top_lps, strict=True)
                ]
                if p.logprobs and k
                else None,
                finish_reason=finish,
                prompt_tokens=len(s.prompt),
                completion_tokens=s.delivered,
                cached_tokens=s.cached,
            )
        )

    def _free_slot(self, index: int, reason: str, held: int | None = None) -> None:
        """`held`: the tokens the row's cache holds, when the row is done on the device."""
        slot = self._active.pop(index)
        self._state = _release(self._state, jnp.int32(index))
        # Speculation may have put tokens past a stop token into the cache: not reusable then.
        # Nor is a prompt with images (positions past an image are not slots).
        known = len(slot.prompt) + len(slot.outputs)
        reusable = held is not None and held < known and reason != "abort"
        if self.prefix_cache and reusable and not slot.multimodal:
            self._kept[index].live = (slot.prompt + slot.outputs)[: held + 1]
        with self._lock:
            self._free.append(index)
        self._finish(slot, reason)

    def _finish(self, slot: _Slot, reason: str) -> None:
        if slot.handle.finished:
            return
        slot.handle.finished = True
        self.counters[f"finished_{reason}"] += 1
        slot.handle._put(
            Event(
                token_ids=[],
                logprobs=[] if slot.params.logprobs else None,
                top_logprobs=[] if slot.params.logprobs and slot.params.top_logprobs else None,
                finish_reason=reason,
                prompt_tokens=len(slot.prompt),
                completion_tokens=slot.delivered,
                cached_tokens=slot.cached,
            )
        )
