"""The serving scheduler: slots, chunked prefill, admission, cancellation, the test hook."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.api import build
from qwenjax.config import ModelConfig
from qwenjax.inference.engine import generate
from qwenjax.inference.sampling import SamplingParams
from qwenjax.serve.scheduler import QueueFull, Scheduler

GREEDY = SamplingParams(temperature=0.0, max_tokens=9)


@pytest.fixture(scope="module")
def model():
    return build(ModelConfig.from_preset("tiny"), dtype=jnp.float32, seed=3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(0, 512, n).tolist() for n in (5, 40, 17, 50, 3, 33, 8)]


def collect(handle):
    tokens, events = [], list(handle)
    for e in events:
        tokens += e.token_ids
    return tokens, events[-1]


@pytest.mark.parametrize("k", [0, 2])
def test_seven_requests_on_three_slots_equal_offline_generate(model, prompts, k):
    """More requests than slots, prompts longer than a prefill chunk (16): every greedy output
    equals offline `generate`, whatever shared the batch while it ran."""
    expected = generate(model, prompts, 9)
    scheduler = Scheduler(
        model, slots=3, max_length=128, prefill_chunk=16, num_speculative_tokens=k
    )
    scheduler.start()
    try:
        handles = [scheduler.submit(p, GREEDY) for p in prompts]
        for i, h in enumerate(handles):
            tokens, last = collect(h)
            assert tokens == expected[i].tolist(), i
            assert last.finish_reason == "length" and last.completion_tokens == 9
            assert last.prompt_tokens == len(prompts[i])
        stats = scheduler.stats()
        assert stats["slots_used"] == 0 and stats["finished_length"] == len(prompts)
        assert stats["generation_tokens_total"] == 9 * len(prompts)
        if k:
            assert stats["spec_decode_num_draft_tokens_total"] > 0
        # The test hook and the reasoning budget hold on both paths (with speculation a forced
        # token acts as a rejection of the drafts from its index on).
        script = [11, 12, 13, 14, 15]
        tokens, _ = collect(scheduler.submit(prompts[1], GREEDY, forced_tokens=script))
        assert tokens[:5] == script and tokens[5:] != script[:4]
        free = expected[3].tolist()
        end = next(t for t in range(512) if t not in free)
        tokens, _ = collect(scheduler.submit(prompts[3], GREEDY, reasoning_budget=(end, 4)))
        assert tokens[:5] == [*free[:4], end]
    finally:
        scheduler.stop()


class OnlyTokens:
    """A `Constraint` that allows a fixed set of ids (ending the reply after `stop_after`)."""

    def __init__(self, ids: list[int], stop_after: int | None = None):
        bits = np.zeros((1, 512), bool)
        bits[0, ids] = True  # bit t % 32 of word t // 32 (a little-endian host)
        self.mask = np.packbits(bits, axis=1, bitorder="little").view(np.int32)
        self.stop_after = stop_after
        self.seen: list[int] = []
        self.finished, self.error = False, None

    def fill(self, out: np.ndarray) -> None:
        out[:] = self.mask

    def advance(self, token: int) -> None:
        self.seen.append(token)
        self.finished = len(self.seen) == self.stop_after


@pytest.mark.parametrize("k", [0, 2])
def test_constrained_rows_sample_only_allowed_tokens(model, prompts, k):
    """A constraint's mask holds on its row from the first token (the prefill's sample) on, so
    its greedy output equals offline generate with every other token biased away; its end
    finishes the request ("stop"); and the rows beside it still equal offline generate (with
    speculation, which pauses while a constrained row runs)."""
    allowed = list(range(0, 512, 3))
    banned = {t: -100.0 for t in range(512) if t % 3}
    expected = generate(model, prompts[2:5], 9)
    masked = generate(model, prompts[:2], 9, logit_bias=banned)
    scheduler = Scheduler(
        model, slots=3, max_length=128, prefill_chunk=16, num_speculative_tokens=k
    )
    scheduler.start()
    try:
        free = [scheduler.submit(p, GREEDY) for p in prompts[2:5]]
        whole, cut = OnlyTokens(allowed), OnlyTokens(allowed, stop_after=4)
        constrained = [
            scheduler.submit(prompts[0], GREEDY, constraint=whole),
            scheduler.submit(prompts[1], GREEDY, constraint=cut),  # a 3-chunk prefill
        ]
        for h, want in zip(free, expected, strict=True):
            assert collect(h)[0] == want.tolist()
        tokens, last = collect(constrained[0])
        assert tokens == whole.seen == masked[0].tolist() and last.finish_reason == "length"
        assert all(t % 3 == 0 for t in tokens)
        tokens, last = collect(constrained[1])
        assert tokens == cut.seen == masked[1, :4].tolist() and last.finish_reason == "stop"
        assert scheduler.stats()["slots_used"] == 0
    finally:
        scheduler.stop()


@pytest.fixture(scope="module")
def scheduler(model):
    s = Scheduler(model, slots=2, max_length=96, prefill_chunk=16, max_waiting=3)
    s.start()
    yield s
    s.stop()


def test_stop_tokens_logprobs_and_forced_tokens(scheduler, model, prompts):
    free = generate(model, [prompts[2]], 9)[0].tolist()
    stop = free[2]
    params = SamplingParams(
        temperature=0.0, max_tokens=9, stop_token_ids=[stop], logprobs=True, top_logprobs=2
    )
    tokens, last = collect(scheduler.submit(prompts[2], params))
    assert tokens == free[: free.index(stop) + 1] and last.finish_reason == "stop"
    # The test hook: the loop emits the script through the real sampler and stop logic.
    script = [11, 12, stop, 13]
    h = scheduler.submit(prompts[0], params, forced_tokens=script)
    events = list(h)
    got = [t for e in events for t in e.token_ids]
    assert got == [11, 12, stop] and events[-1].finish_reason == "stop"
    assert all(len(e.top_logprobs) == len(e.token_ids) for e in events)
    assert all(len(row) == 2 for e in events for row in e.top_logprobs)


def test_cancel_frees_the_slot_and_queue_limits(scheduler, prompts):
    long = SamplingParams(temperature=0.0, max_tokens=80)
    h = scheduler.submit(prompts[0], long)
    it = iter(h)
    first = next(it)
    assert first.token_ids and first.finish_reason is None
    h.cancel()
    rest = list(it)
    assert rest[-1].finish_reason == "abort" and rest[-1].completion_tokens < 80
    assert scheduler.stats()["slots_used"] == 0
    # Two slots busy, three waiting: the sixth request is refused.
    handles = [scheduler.submit(prompts[4], long) for _ in range(2)]
    deadline = time.monotonic() + 60
    while scheduler.stats()["running"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    handles += [scheduler.submit(prompts[4], long) for _ in range(3)]
    with pytest.raises(QueueFull, match="limit 3"):
        scheduler.submit(prompts[4], long)
    for h in handles:
        h.cancel()
    for h in handles:
        assert collect(h)[1].finish_reason in ("abort", "length")
    assert scheduler.stats()["slots_used"] == 0


def test_bad_requests(scheduler):
    with pytest.raises(ValueError, match="empty"):
        scheduler.submit([], GREEDY)
    with pytest.raises(ValueError, match=r"in \[0, 512\)"):
        scheduler.submit([1, 512], GREEDY)
    with pytest.raises(ValueError, match="context of 96 tokens"):
        scheduler.submit([1] * 90, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="top_p"):
        scheduler.submit([1], SamplingParams(top_p=0.0))


def test_async_clients(scheduler, model, prompts):
    expected = generate(model, prompts[:4], 9)

    async def one(p):
        tokens = []
        async for e in scheduler.submit(p, GREEDY):
            tokens += e.token_ids
        return tokens

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts[:4]))

    for got, want in zip(asyncio.run(main()), expected, strict=True):
        assert got == want.tolist()


def test_reasoning_budget_forces_the_end_token_once(scheduler, model, prompts):
    free = generate(model, [prompts[5]], 9)[0].tolist()
    end = next(t for t in range(512) if t not in free)
    tokens, _ = collect(scheduler.submit(prompts[5], GREEDY, reasoning_budget=(end, 3)))
    assert tokens[:4] == [*free[:3], end]  # forced at index 3, then decoding goes on from it
    # Already produced within the budget (index 1): nothing is forced.
    tokens, _ = collect(scheduler.submit(prompts[5], GREEDY, reasoning_budget=(free[1], 3)))
    assert tokens == free
    # A zero budget forces it as the very first token (the prefill's sample).
    tokens, _ = collect(scheduler.submit(prompts[5], GREEDY, reasoning_budget=(end, 0)))
    assert tokens[0] == end


def test_a_stop_that_times_out_leaves_the_loop_to_end_and_abort(model, prompts, caplog):
    """A loop still in a step when `stop` gives up keeps its thread and its requests: it aborts
    them when the step ends, and `start` waits for it before a new loop runs the same state
    (stop used to drop the thread and clear the requests under the running loop)."""
    s = Scheduler(model, slots=2, max_length=96, prefill_chunk=16)
    inside, release = threading.Event(), threading.Event()
    real_step = s._step

    def slow_step():
        inside.set()
        assert release.wait(60)
        real_step()

    s._step = slow_step
    s.start()
    h = s.submit(prompts[0], SamplingParams(temperature=0.0, max_tokens=40))
    assert inside.wait(60)
    old = s._thread
    with caplog.at_level(logging.WARNING, logger="qwenjax.serve.scheduler"):
        s.stop(drain=False, timeout=0.2)
    assert "did not stop within 0.2 s" in caplog.text
    assert old.is_alive() and s._thread is old and not s.healthy and not h.finished
    release.set()
    assert collect(h)[1].finish_reason == "abort"
    s._step = real_step
    s.start()
    assert not old.is_alive() and s._thread is not old and s.healthy
    assert collect(s.submit(prompts[2], GREEDY))[0] == generate(model, [prompts[2]], 9)[0].tolist()
    s.stop()
    assert s._thread is None and not s.healthy


def test_a_restart_after_aborted_requests_has_every_slot(model, prompts):
    """`stop(drain=False)` aborts the running requests; their slots are free again for the next
    `start` (they used to stay taken, so a restarted scheduler ran on fewer slots or none)."""
    s = Scheduler(model, slots=2, max_length=96, prefill_chunk=16)
    s.start()
    try:
        long = SamplingParams(temperature=0.0, max_tokens=80)
        handles = [s.submit(prompts[i], long) for i in (0, 4)]
        deadline = time.monotonic() + 120
        while s.stats()["running"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        s.stop(drain=False)
        assert [collect(h)[1].finish_reason for h in handles] == ["abort", "abort"]
        assert sorted(s._free) == [0, 1] and not s._active
        s.start()
        handles = [s.submit(p, GREEDY) for p in prompts[2:4]]  # both at once: both slots
        expected = generate(model, prompts[2:4], 9)
        assert [collect(h)[0] for h in handles] == [e.tolist() for e in expected]
        assert s.stats()["finished_abort"] == 2
    finally:
        s.stop()
