"""A scheduler double with `qwenjax.serve.scheduler.Scheduler`'s interface and scripted tokens,
for testing the HTTP layer without a model: forced tokens (or a fixed reply) come out a few per
event, as with MTP speculation, and `stop_token_ids`, `max_tokens` and a reasoning budget act on
them as in the engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Sequence

from qwenjax.serve.scheduler import QueueFull


@dataclasses.dataclass
class Event:
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class Handle:
    def __init__(self, owner: FakeScheduler, id: str, prompt_ids, params, tokens: list[int]):
        self.id = id
        self._owner = owner
        self._prompt = len(prompt_ids)
        self._params = params
        self._tokens = tokens
        self._cancelled = asyncio.Event()
        self.done = False

    def cancel(self) -> None:
        # Frees the slot at once, as the real scheduler does, even if nobody iterates further.
        self._cancelled.set()
        self._owner.active.discard(self)

    async def __aiter__(self) -> AsyncIterator[Event]:
        owner, p = self._owner, self._params
        stop_ids = set(owner.stop_token_ids) | set(p.stop_token_ids)
        limit = p.max_tokens if p.max_tokens is not None else 1 << 30
        out: list[int] = []
        try:
            await asyncio.sleep(owner.first_delay)
            for i in itertools.count(0, owner.tokens_per_event):
                if self._cancelled.is_set():
                    yield self._event([], "abort", len(out))
                    return
                new, reason = [], None
                for t in self._tokens[i : i + owner.tokens_per_event]:
                    new.append(t)
                    if t in stop_ids:
                        reason = "stop"
                        break
                    if len(out) + len(new) >= limit:
                        reason = "length"
                        break
                if not new and reason is None:
                    reason = "length"  # the script ran out
                out += new
                owner.generated += len(new)
                yield self._event(new, reason, len(out))
                if reason is not None:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cancelled.wait(), owner.delay)
        finally:
            self.done = True
            owner.active.discard(self)

    def _event(self, tokens: list[int], reason: str | None, count: int) -> Event:
        logprobs = top = None
        if self._params.logprobs:
            logprobs = [-0.5] * len(tokens)
            k = self._params.top_logprobs or 0
            top = [[(t, -0.5)] + [(j, -1.0 - j) for j in range(k - 1)] for t in tokens]
        return Event(tokens, logprobs, top, reason, self._prompt, count)


class FakeScheduler:
    def __init__(
        self,
        reply: Sequence[int],
        *,
        slots: int = 4,
        max_waiting: int = 4,
        stop_token_ids: Sequence[int] = (),
        tokens_per_event: int = 3,
        delay: float = 0.002,
        first_delay: float = 0.0,
    ):
        self.reply = list(reply)
        self.slots = slots
        self.max_waiting = max_waiting
        self.stop_token_ids = tuple(stop_token_ids)
        self.tokens_per_event = tokens_per_event
        self.delay = delay
        self.first_delay = first_delay
        self.active: set[Handle] = set()
        self.submitted: list[tuple[list[int], object, list[int] | None]] = []
        self.prompt_tokens = 0
        self.generated = 0
        self.started = self.stopped = False
        self.error: BaseException | None = None  # set by a test: the engine loop "died"
        self._ids = itertools.count()

    def start(self) -> None:
        self.started = True

    @property
    def healthy(self) -> bool:
        return self.started and not self.stopped and self.error is None

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        self.stopped = True

    def submit(self, prompt_ids, params, *, forced_tokens=None, reasoning_budget=None) -> Handle:
        if len(self.active) >= self.slots + self.max_waiting:
            raise QueueFull("queue full")
        if not prompt_ids:
            raise ValueError("empty prompt")
        self.submitted.append((list(prompt_ids), params, forced_tokens))
        self.prompt_tokens += len(prompt_ids)
        tokens = list(forced_tokens) if forced_tokens is not None else list(self.reply)
        if reasoning_budget is not None:  # as the engine: the end token replaces token n
            end, n = reasoning_budget
            if end not in tokens[:n] and len(tokens) > n:
                tokens[n] = end
        handle = Handle(self, f"req-{next(self._ids)}", prompt_ids, params, tokens)
        self.active.add(handle)
        return handle

    def stats(self) -> dict:
        running = min(len(self.active), self.slots)
        return {
            "running": running,
            "waiting": len(self.active) - running,
            "slots": self.slots,
            "slots_used": running,
            "prompt_tokens_total": self.prompt_tokens,
            "generation_tokens_total": self.generated,
        }
