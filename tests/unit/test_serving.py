"""The serving core's `generation()`: on every exit path — answered, failed before the first token, failed
or abandoned mid-stream, timed out before starting — the engine stream is closed and the caller's
concurrency slot is free again (no route can leak one)."""

from __future__ import annotations

import asyncio

import pytest

from serve.api.serving import generation, open_generation
from serve.auth import Caller
from serve.engine.types import Completion, EngineUnavailable, GenerationRequest, StartTimeout, TextDelta
from serve.jobs.models import LimitExceeded, Limits
from serve.media.errors import ImageLoadError
from serve.telemetry.access import RequestContext
from tests.conftest import data_uri
from tests.fakes import FakeEngine, SlowEngine, make_services

CALLER = Caller(name="solo", limits=Limits(rate_per_minute=1000, max_concurrent=1))


def build(image) -> GenerationRequest:
    return GenerationRequest(request_id="r", owner="solo", prompt="p", image=image, max_tokens=3, temperature=0.0,
                             top_p=1.0, stream=True)


def gen(services, url=None, **kw):
    return generation(services, RequestContext(api="fal"), CALLER, url or data_uri(), build, stream=True, **kw)


async def slot_is_free(services) -> bool:
    """One more generation gets the caller's only slot (and frees it again)."""
    try:
        async with gen(services) as g:
            async for _ in g.items:
                pass
        return True
    except LimitExceeded:
        return False


class FailsMidStream(FakeEngine):
    async def generate(self, request):
        yield TextDelta("a", 1)
        raise EngineUnavailable("engine died")


class SlowStart(FakeEngine):
    async def generate(self, request):
        await asyncio.sleep(5)
        yield Completion(1, 0, "stop")


async def _answered(services):
    async with gen(services) as g:
        items = [item async for item in g.items]
    assert isinstance(items[-1], Completion) and g.admission.allowed


async def _image_fails(services):
    with pytest.raises(ImageLoadError):
        async with gen(services, url="data:image/png;base64,aGVsbG8="):
            pass


async def _engine_refuses(services):
    services.engine.fail_with = EngineUnavailable("down")
    with pytest.raises(EngineUnavailable):
        async with gen(services):
            pass
    services.engine.fail_with = None


async def _fails_mid_stream(services):
    services.engine = FailsMidStream()
    with pytest.raises(EngineUnavailable):
        async with gen(services) as g:
            async for _ in g.items:
                pass


async def _caller_leaves(services):
    services.engine = engine = SlowEngine(delay=0.05)
    held, end = await open_generation(services, RequestContext(api="fal"), CALLER, data_uri(), build, stream=True)
    await anext(held.items)
    assert not await slot_is_free(services)  # held while the stream is open
    await end()  # what the streamed response runs when its client is gone
    assert engine.cancelled == 1  # the engine work stopped


async def _start_timeout(services):
    services.engine = SlowStart()
    with pytest.raises(StartTimeout):
        async with gen(services, start_timeout_s=0.1):
            pass


@pytest.mark.parametrize("path", [_answered, _image_fails, _engine_refuses, _fails_mid_stream, _caller_leaves,
                                  _start_timeout], ids=lambda f: f.__name__.strip("_"))
def test_every_exit_path_frees_the_slot(path):
    async def main():
        services = make_services(FakeEngine())
        await path(services)
        services.engine = FakeEngine()
        assert await slot_is_free(services)

    asyncio.run(main())


def test_a_second_generation_is_refused_while_the_only_slot_is_held():
    async def main():
        services = make_services(FakeEngine())
        async with gen(services):
            with pytest.raises(LimitExceeded):
                async with gen(services):
                    pass

    asyncio.run(main())
