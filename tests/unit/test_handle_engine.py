"""HandleEngine: Ray's failures become EngineUnavailable; stopping early cancels the replica call."""

import asyncio

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from serve.engine.server import HandleEngine
from serve.engine.types import Completion, EngineInputError, EngineUnavailable, TextDelta


class FakeResponse:
    def __init__(self, items, error=None):
        self._items, self._error, self.cancelled = list(items), error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._items:
            return self._items.pop(0)
        if self._error:
            raise self._error
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    def __init__(self, response):
        self.response = response
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, _request):
        return self.response


ITEMS = [TextDelta("a", 1), TextDelta("b", 1), Completion(10, 2, "length")]


async def drain(engine):
    return [item async for item in engine.generate(None)]


def test_items_pass_through_and_a_finished_call_is_not_cancelled():
    response = FakeResponse(ITEMS)
    assert asyncio.run(drain(HandleEngine(FakeHandle(response)))) == ITEMS
    assert not response.cancelled


@pytest.mark.parametrize("error", [ActorDiedError(), BackPressureError(num_queued_requests=1, max_queued_requests=1)])
def test_ray_failures_become_engine_unavailable(error):
    response = FakeResponse(ITEMS[:1], error)
    with pytest.raises(EngineUnavailable):
        asyncio.run(drain(HandleEngine(FakeHandle(response))))


def test_the_replicas_own_errors_pass_through():
    with pytest.raises(EngineInputError):
        asyncio.run(drain(HandleEngine(FakeHandle(FakeResponse([], EngineInputError("too long"))))))


def test_the_replicas_errors_arrive_in_its_words_without_rays_traceback():
    """Ray raises a replica's exception as a RayTaskError whose text is the remote traceback (pid, address,
    file paths); what reaches a client is the replica's own message."""
    from ray.exceptions import RayTaskError

    try:
        raise EngineInputError("The prompt is 5000 tokens")
    except EngineInputError as cause:
        wrapped = RayTaskError("generate", "Traceback ... pid=123, ip=10.0.0.1 /app/serve/x.py", cause)
    remote = wrapped.as_instanceof_cause()
    assert "pid=" in str(remote)  # what the client used to see
    with pytest.raises(EngineInputError) as got:
        asyncio.run(drain(HandleEngine(FakeHandle(FakeResponse([], remote)))))
    assert str(got.value) == "The prompt is 5000 tokens" and not isinstance(got.value, RayTaskError)


def test_stopping_early_cancels_the_call():
    response = FakeResponse(ITEMS)

    async def first_only():
        gen = HandleEngine(FakeHandle(response)).generate(None)
        item = await gen.__anext__()
        await gen.aclose()
        return item

    assert asyncio.run(first_only()) == ITEMS[0]
    assert response.cancelled


def test_stopping_at_the_completion_does_not_cancel_the_finished_call():
    response = FakeResponse(ITEMS)

    async def until_completion():
        from serve.engine.types import collect

        return await collect(HandleEngine(FakeHandle(response)).generate(None))  # returns at the Completion

    chunks, done = asyncio.run(until_completion())
    assert chunks == ["a", "b"] and done == ITEMS[-1]
    assert not response.cancelled  # no cancellation round trip for a call that had ended


class Checked:
    """A replica's health check as a handle call: fails while `dead`."""

    def __init__(self):
        self.dead, self.calls = True, 0

    async def remote(self):
        self.calls += 1
        if self.dead:
            raise ActorDiedError()


def test_a_replica_that_died_under_a_call_makes_the_engine_unready_until_one_answers():
    """The controller counts a killed replica as running until its next health check; the ingress, which saw it
    die, says not ready at once, and ready again once a replica answers."""
    handle = FakeHandle(FakeResponse(ITEMS[:1], ActorDiedError()))
    handle.check_health = Checked()
    engine = HandleEngine(handle)
    engine._ask_controller = lambda: ("HEALTHY", 1)  # what the controller says all along

    async def main():
        await engine.check_health()  # nothing died yet: the controller's word, no replica call
        assert handle.check_health.calls == 0
        with pytest.raises(EngineUnavailable):
            await drain(engine)
        with pytest.raises(EngineUnavailable, match="died"):
            await engine.check_health()
        handle.check_health.dead = False  # the replacement answers
        await engine.check_health()
        await engine.check_health()
        return handle.check_health.calls

    assert asyncio.run(main()) == 2  # asked until it answered, then the controller again
