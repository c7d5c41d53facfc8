"""Streamed deltas leave the engine replica at most once per interval, without delaying the first token
or losing text, tokens or the completion."""

from __future__ import annotations

import asyncio

import pytest

from serve.engine.types import Completion, TextDelta, coalesce
from tests.conftest import Clock


def at(clock, items):
    """A stream whose items arrive at given clock times: [(t, item), ...]."""

    async def gen():
        for t, item in items:
            clock.now = t
            yield item

    return gen()


async def drain(stream) -> list:
    return [item async for item in stream]


def deltas(*texts):
    return [TextDelta(t, len(t)) for t in texts]


async def test_merges_within_the_interval_and_keeps_every_token():
    clock = Clock(0.0)
    a, b, c, d, e = deltas("a", "bb", "c", "dd", "e")
    done = Completion(10, 7, "length")
    source = [(0.000, a), (0.005, b), (0.010, c), (0.021, d), (0.030, e), (0.031, done)]
    out = await drain(coalesce(at(clock, source), 0.02, clock))
    # a at once; bb and c wait; at 21 ms the merged "bbcdd" leaves; "e" rides out with the completion.
    assert out == [TextDelta("a", 1), TextDelta("bbcdd", 5), TextDelta("e", 1), done]
    assert sum(i.num_tokens for i in out if isinstance(i, TextDelta)) == done.num_output_tokens


async def test_zero_interval_sends_every_delta():
    clock = Clock(0.0)
    items = [*deltas("x", "y", "z"), Completion(1, 3, "stop")]
    assert await drain(coalesce(at(clock, [(0.0, i) for i in items]), 0.0, clock)) == items


async def test_slow_engine_deltas_are_never_held():
    clock = Clock(0.0)
    items = deltas("one ", "two ", "three")
    source = [(0.04 * i, d) for i, d in enumerate(items)] + [(0.2, Completion(1, 3, "stop"))]
    out = await drain(coalesce(at(clock, source), 0.02, clock))
    assert out[:3] == items  # 40 ms apart (a GPU's decode step): each leaves as it comes


async def test_first_token_leaves_before_the_engine_produces_the_second():
    second = asyncio.Event()

    async def engine():
        yield TextDelta("first", 1)
        await second.wait()
        yield TextDelta("second", 1)
        yield Completion(1, 2, "stop")

    stream = coalesce(engine(), 10.0)
    assert await asyncio.wait_for(anext(stream), 1) == TextDelta("first", 1)
    second.set()
    assert await drain(stream) == [TextDelta("second", 1), Completion(1, 2, "stop")]


async def test_held_text_reaches_the_caller_before_a_failure():
    clock = Clock(0.0)

    async def engine():
        clock.now = 0.0
        yield TextDelta("a", 1)
        clock.now = 0.001
        yield TextDelta("b", 1)
        raise RuntimeError("engine died")

    got = []
    with pytest.raises(RuntimeError, match="engine died"):
        async for item in coalesce(engine(), 0.02, clock):
            got.append(item)
    assert got == [TextDelta("a", 1), TextDelta("b", 1)]


async def test_a_caller_that_leaves_closes_the_engine_stream_at_once():
    closed = asyncio.Event()

    async def engine():
        try:
            yield TextDelta("a", 1)
            yield TextDelta("b", 1)
            yield Completion(1, 2, "stop")
        finally:
            closed.set()  # vLLM's generate() aborts the request here

    stream = coalesce(engine(), 0.0)
    assert await anext(stream) == TextDelta("a", 1)
    await stream.aclose()
    assert closed.is_set()


async def test_text_held_when_the_stream_ends_without_a_completion_is_delivered():
    clock = Clock(0.0)
    out = await drain(coalesce(at(clock, [(0.0, TextDelta("a", 1)), (0.001, TextDelta("b", 1))]), 0.02, clock))
    assert out == [TextDelta("a", 1), TextDelta("b", 1)]
