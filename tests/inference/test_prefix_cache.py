"""Prefix reuse in the serving scheduler: a prompt that starts with what a free slot's cache
holds prefills only the rest, from the row as its last request left it ("live") or from the
GDN snapshot taken at the prompt's last boundary token ("snapshot"). Every greedy output equals
offline `generate` on the whole prompt, and the cache a reused request ends with equals the one
a whole prefill gives."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.serve_hlo import whole_leaf_gathers
from qwenjax.api import build
from qwenjax.config import ModelConfig
from qwenjax.inference.engine import generate
from qwenjax.inference.sampling import SamplingParams
from qwenjax.model.cache import DeltaNetCache
from qwenjax.serve import scheduler as sched
from qwenjax.serve.scheduler import Scheduler, _Kept
from tests.scheduler_cases import mesh_model

BOUNDARY = 7  # these tests' `<|im_start|>`
GREEDY = SamplingParams(temperature=0.0, max_tokens=7)
SETUP = {"slots": 2, "max_length": 160, "prefill_chunk": 16}


@pytest.fixture(scope="module")
def model():
    return build(ModelConfig.from_preset("tiny"), dtype=jnp.float32, seed=4)


def collect(handle):
    """A request's tokens and its last event."""
    events = list(handle)
    return [t for e in events for t in e.token_ids], events[-1]


def run(scheduler, prompt):
    return collect(scheduler.submit(prompt, GREEDY))


def conversation(scheduler, seed=0):
    """Four requests that reuse a slot's cache in each way, and one that shares its slots;
    returns the prompts, their outputs and cached token counts, and the slots' kept records."""
    rng = np.random.default_rng(seed)
    rnd = lambda n: [int(t) for t in rng.integers(8, 512, n)]  # never the boundary token
    prompts, outputs, cached = [], [], []

    def turn(prompt, handle=None):
        tokens, last = collect(handle or scheduler.submit(prompt, GREEDY))
        prompts.append(prompt)
        outputs.append(tokens)
        cached.append(last.cached_tokens)
        return tokens

    scheduler.start()
    try:
        p1 = [*rnd(29), BOUNDARY, *rnd(3)]
        out1 = turn(p1)
        # The next turn extends the whole exchange (live reuse) while another request, with
        # nothing to reuse, takes the other slot.
        other = rnd(20)
        p2 = [*p1, *out1, *rnd(5), BOUNDARY, *rnd(2)]
        handles = [scheduler.submit(p, GREEDY) for p in (other, p2)]
        turn(other, handles[0])
        turn(p2, handles[1])
        # The history up to the last boundary, then a reply re-rendered differently (snapshot).
        b2 = len(p2) - 3
        p3 = [*p2[:b2], BOUNDARY, *rnd(20), BOUNDARY, *rnd(3)]
        turn(p3)
        # Diverges before any kept point: prefilled whole.
        turn([*p3[:10], *rnd(5)])
    finally:
        scheduler.stop()
    return prompts, outputs, cached, b2


@pytest.mark.parametrize("k", [0, 2])
def test_reused_turns_equal_offline_generate_and_a_whole_prefill(model, k):
    scheduler = Scheduler(model, **SETUP, num_speculative_tokens=k, boundary_token=BOUNDARY)
    prompts, outputs, cached, b2 = conversation(scheduler)
    p1, p3 = prompts[0], prompts[3]
    assert cached == [0, 0, len(p1) + len(outputs[0]) - 1, b2, 0]
    expected = generate(model, prompts, 7, num_speculative_tokens=0)
    for i, out in enumerate(outputs):
        assert out == expected[i].tolist(), i
    stats = scheduler.stats()
    assert stats["prefix_cache_hits_total"] == sum(cached)
    assert stats["prefix_cache_queries_total"] == sum(map(len, prompts))

    # p3 ran in slot 0 from its snapshot; its row must equal that of a whole prefill of p3.
    fresh = Scheduler(model, **SETUP, num_speculative_tokens=k, prefix_cache=False)
    fresh.start()
    try:
        tokens, last = run(fresh, p3)  # its first request: slot 0
        assert tokens == outputs[3] and last.cached_tokens == 0
    finally:
        fresh.stop()
    slot = next(i for i, kept in enumerate(scheduler._kept) if kept.snapshot == p3[: len(p3) - 3])
    assert_rows_equal(scheduler._state.cache, slot, fresh._state.cache, 0)


def drive(scheduler, until):
    """Run the scheduler's loop on this thread, so admissions happen exactly when the test
    says, until `until()`."""
    with scheduler._rules():
        for _ in range(2000):
            if until():
                return
            scheduler._cancel_requested()
            scheduler._admit()
            scheduler._step()
    raise AssertionError("the scheduler made no progress")


def shared_system(scheduler, seed):
    """Three conversations with one system prompt: while the first still decodes, a second
    copies its system snapshot and a third (its prompt again) its last snapshot; once all are
    done, a fourth reuses the system snapshot in place; then three more arrive at once with
    another. Returns the prompts, the outputs, the cached token counts, the slot each of the
    first four ran in, and the caches the first three and the fourth left."""
    rng = np.random.default_rng(seed)
    rnd = lambda n: [int(t) for t in rng.integers(8, 512, n)]  # never the boundary token
    system = [BOUNDARY, *rnd(24)]
    turn = lambda: [BOUNDARY, *rnd(6), BOUNDARY, *rnd(2)]
    a = [*system, *turn()]
    prompts = [a, [*system, *turn()], a, [*system, *turn()]]
    handles = [scheduler.submit(a, dataclasses.replace(GREEDY, max_tokens=40))]
    drive(scheduler, lambda: any(s.delivered for s in scheduler._active.values()))
    handles += [scheduler.submit(p, GREEDY) for p in prompts[1:3]]
    with scheduler._rules():
        scheduler._admit()
    where = {s.handle: i for i, s in scheduler._active.items()}
    assert len(where) == 3  # the first is still decoding
    slots = [where[h] for h in handles]
    # The copies' records: the system copy drops the last point, which lies past what it reuses.
    kept = [scheduler._kept[i] for i in slots]
    assert kept[1] == sched._Kept(system=a[:26])
    assert kept[2] == sched._Kept(system=a[:26], snapshot=a[: len(a) - 2])
    drive(scheduler, lambda: not scheduler._active)
    cache = jax.device_get(scheduler._state.cache)
    handles.append(scheduler.submit(prompts[3], GREEDY))
    with scheduler._rules():
        scheduler._admit()
    slots.append(next(iter(scheduler._active)))
    drive(scheduler, lambda: not scheduler._active)
    caches = [cache, jax.device_get(scheduler._state.cache)]
    # Three at once with another system prompt: prefills run oldest first, so the second and
    # third wait for the first's anyway, and then copy its system snapshot.
    other = [BOUNDARY, *rnd(24)]
    burst = [[*other, *turn()] for _ in range(3)]
    prompts += burst
    handles += [scheduler.submit(p, GREEDY) for p in burst]
    drive(scheduler, lambda: all(h.finished for h in handles))
    results = [collect(h) for h in handles]
    outputs = [tokens for tokens, _ in results]
    cached = [last.cached_tokens for _, last in results]
    return prompts, outputs, cached, slots, caches


def equal_generate(model, prompts, outputs):
    expected = generate(model, prompts, max(map(len, outputs)))
    for i, out in enumerate(outputs):
        assert out == expected[i][: len(out)].tolist(), i


def test_a_system_prompt_is_shared_across_slots(model):
    """With MTP (k = 2), so the MTP cache's rows are copied too."""
    setup = {**SETUP, "slots": 3, "num_speculative_tokens": 2}
    scheduler = Scheduler(model, **setup, boundary_token=BOUNDARY)
    prompts, outputs, cached, slots, (cache, cache_d) = shared_system(scheduler, seed=5)
    system, last = 25, len(prompts[0]) - 3
    assert cached == [0, system, last, system, 0, system, system]
    assert list(map(len, outputs)) == [40] + [7] * 6
    equal_generate(model, prompts, outputs)
    # The copies' rows (GDN states, K/V, MTP K/V) equal whole prefills of their prompts.
    # The fourth reuses, in place, a system snapshot that came with a copy.
    assert slots[3] in slots[1:3]
    fresh = Scheduler(model, **setup, prefix_cache=False)
    fresh.start()
    try:
        for p, out in zip(prompts[1:4], outputs[1:4], strict=True):  # slots 0, 1, 2
            assert run(fresh, p)[0] == out
    finally:
        fresh.stop()
    ours = [(cache, slots[1]), (cache, slots[2]), (cache_d, slots[3])]
    for row, ((mine, slot), theirs) in enumerate(zip(ours, (0, 1, 2), strict=True)):
        assert slot != slots[0], row
        assert_rows_equal(mine, slot, fresh._state.cache, theirs)


def assert_rows_equal(cache, row, other, other_row):
    """Row `row` of `cache` equals row `other_row` of `other` over the slots it holds (fp32;
    the two were prefilled in different chunks)."""
    n = int(cache.length[row])
    assert n == int(other.length[other_row])
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), 2e-5, 2e-6)
    for mine, theirs in zip(cache.blocks, other.blocks, strict=True):
        if isinstance(mine, DeltaNetCache):
            close(mine.state[:, row], theirs.state[:, other_row])
            close(mine.conv[:, row], theirs.conv[:, other_row])
        else:  # K/V [NB, B, K, S, H]: the slots written so far
            close(mine.k[:, row, :, :n], theirs.k[:, other_row, :, :n])
            close(mine.v[:, row, :, :n], theirs.v[:, other_row, :, :n])
    if cache.mtp is not None:  # its entry n-1 pairs with the last token, not yet in the trunk
        close(cache.mtp.k[row, :, :n], other.mtp.k[other_row, :, :n])
        close(cache.mtp.v[row, :, :n], other.mtp.v[other_row, :, :n])


def test_reuse_on_a_mesh_equals_single_device_generate():
    """The snapshots, the reused rows and the copies between slots on 8 CPU devices (fsdp 4 x
    tensor 2): the cache and the snapshots are born split over the mesh and stay so, and the
    second round of conversations compiles nothing new."""
    config = ModelConfig.from_preset("tiny")
    model, mesh = mesh_model(config, seed=4)
    assert len(jax.tree.leaves(model)[0].sharding.device_set) == 8
    setup = {**SETUP, "slots": 4}
    scheduler = Scheduler(model, **setup, boundary_token=BOUNDARY, **mesh)
    born = jax.tree.map(lambda x: x.sharding, (scheduler._state.cache, scheduler._snaps))
    gdn = [x.state for snap in scheduler._snaps.values() for x in snap if x is not None]
    gdn.append(next(x.state for x in scheduler._state.cache.blocks if isinstance(x, DeltaNetCache)))
    for state in gdn:  # [NB, B, N, E, H]: slots over fsdp, heads over tensor
        nb, b, n, e, h = state.shape
        assert {s.data.shape for s in state.addressable_shards} == {(nb, b // 4, n // 2, e, h)}
    prompts, outputs, cached, b2 = conversation(scheduler, seed=1)
    assert cached == [0, 0, len(prompts[0]) + len(outputs[0]) - 1, b2, 0]
    single = build(config, dtype=jnp.float32, seed=4)
    expected = generate(single, prompts, 7)
    for i, out in enumerate(outputs):
        assert out == expected[i].tolist(), i
    # Copies between slots on different devices.
    prompts, outputs, cached, _, _ = shared_system(scheduler, seed=1)
    assert cached == [0, 25, len(prompts[0]) - 3, 25, 0, 25, 25]
    equal_generate(single, prompts, outputs)
    assert jax.tree.map(lambda x: x.sharding, (scheduler._state.cache, scheduler._snaps)) == born
    compiled = lambda: [f._cache_size() for f in (sched._admit, sched._snapshot, sched._decode)]
    before = compiled()
    conversation(scheduler, seed=3)
    shared_system(scheduler, seed=3)
    assert compiled() == before
    assert gathered_rows(scheduler) == []


def gathered_rows(scheduler) -> list[str]:
    """The all-gathers of whole cache or snapshot leaves (every slot on each device) in the
    compiled functions that move rows: admission (a copy), the snapshot and a prefill chunk.
    XLA partitions a dynamic slice of the split slot axis so, the whole cache at every chunk,
    until the rows moved inside `shard_map`."""
    s = scheduler
    request = s._row_request(0, sched._Slot(handle=None, prompt=[9, 9], params=GREEDY))
    ids, slot = jnp.zeros((1, 16), jnp.int32), jnp.int32(1)
    with s._rules():
        lowered = [
            sched._admit.lower(
                s._state, s._req, s._snaps, slot, jnp.int32(2), request, jnp.int32(3),
                mode="copy", point="system",
            ),
            sched._snapshot.lower(s._snaps["system"], s._state, slot),
            sched._prefill_chunk.lower(
                s.graphdef, s.params, s._state, s._req, slot, ids, jnp.int32(16), ids, None,
                opts=s.opts, last=True,
            ),
        ]  # fmt: skip
    leaves = jax.tree.leaves((s._state.cache.blocks, s._snaps))
    return [g for f in lowered for g in whole_leaf_gathers(f.compile().as_text(), leaves, s.slots)]


def test_without_prefix_cache_every_prompt_is_prefilled_whole(model):
    scheduler = Scheduler(model, **SETUP, prefix_cache=False, boundary_token=BOUNDARY)
    assert scheduler._snaps is None  # no snapshot memory either
    prompts, outputs, cached, _ = conversation(scheduler, seed=2)
    assert cached == [0] * 5
    expected = generate(model, prompts, 7)
    assert outputs == [e.tolist() for e in expected]


def test_kept_points_need_the_token_that_followed_them():
    kept = _Kept(live=[1, 2, 3, 4, 5], snapshot=[1, 2, 7])
    assert kept.reuse([1, 2, 3, 4, 5, 6]) == (4, "live")
    assert kept.reuse([1, 2, 3, 4, 5]) == (4, "live")  # one token left to prefill
    assert kept.reuse([1, 2, 3, 4]) == (0, "reset")  # nothing left: no logits to sample from
    assert kept.reuse([1, 2, 3, 4, 6, 5]) == (0, "reset")  # MTP's entry 3 pairs with token 5
    assert kept.reuse([1, 2, 7, 9]) == (2, "snapshot")
    assert kept.reuse([1, 2, 8, 9]) == (0, "reset")
    assert _Kept(live=[1, 2, 7, 3], snapshot=[1, 2, 7]).reuse([1, 2, 7, 3, 4]) == (3, "live")
    assert _Kept().reuse([1, 2, 3]) == (0, "reset")


def test_the_system_point_and_what_an_admission_keeps():
    kept = _Kept(
        live=[7, 1, 2, 7, 3, 4, 7, 5, 6], system=[7, 1, 2, 7], snapshot=[7, 1, 2, 7, 3, 4, 7]
    )
    assert kept.reuse([7, 1, 2, 7, 5]) == (3, "system")
    assert kept.reuse([7, 1, 2, 7, 3, 4, 7, 8]) == (6, "snapshot")
    assert kept.reuse([7, 1, 2, 7, 3, 4, 7, 5, 6, 9]) == (8, "live")
    assert kept.reuse([7, 1, 2, 7, 3, 4, 7, 5, 6, 9], copy=True) == (6, "snapshot")  # not live
    assert kept.reuse([7, 1, 3]) == (0, "reset")
    kept.keep_only(6)  # a request that reuses the last snapshot: its row changes after slot 6
    assert (kept.live, kept.system, kept.snapshot) == (None, [7, 1, 2, 7], [7, 1, 2, 7, 3, 4, 7])
    kept.keep_only(3)  # the system point: the last snapshot's K/V are rewritten
    assert (kept.system, kept.snapshot) == ([7, 1, 2, 7], None)
    kept.keep_only(0)
    assert kept == _Kept()
    points = lambda prompt, keep=0, least=0: sched._snapshot_points(prompt, 7, keep, least)
    assert points([7, 1, 2, 7, 3, 7, 4]) == {3: "system", 5: "snapshot"}
    assert points([7, 1, 2, 7, 3, 7, 4], keep=3) == {5: "snapshot"}
    assert points([7, 1, 2, 7, 3, 7, 4], keep=5) == {}
    assert points([1, 2, 7, 3]) == {2: "snapshot"}
    assert points([7, 1, 2]) == points([1, 2]) == {}
    assert points([7, 1, 2, 7, 3, 7, 4], least=3) == {3: "system", 5: "snapshot"}
    assert points([7, 1, 2, 7, 3, 7, 4], least=4) == {5: "snapshot"}  # too short to pay
