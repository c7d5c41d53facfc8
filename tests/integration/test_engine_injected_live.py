"""The engine deployment takes its engine from a factory (`serve.app.engine_app`): the real Serve path —
replica, streaming handle, `HandleEngine`, health through Serve's controller, cancellation across the
process boundary — run here on the fake engine, in a second application on the live test cluster."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from PIL import Image
import ray
from ray import serve

from serve.app import ENGINE_DEPLOYMENT, engine_app
from serve.engine.server import HandleEngine
from serve.engine.types import Completion, GenerationRequest, TextDelta, collect
from tests.fakes import served_fake_engine

APP = "llava-fake-engine"


@pytest.fixture(scope="module")
def fake_engine_app(stack, stack_config):
    # No CPU of its own: the vLLM replica of the shared stack holds the machine's cores.
    cfg = stack_config.model_copy(update={
        "app_name": APP, "engine_deployment": stack_config.engine_deployment.model_copy(update={"num_cpus": 0})})
    started = time.monotonic()
    serve.run(engine_app(cfg, served_fake_engine), name=APP, route_prefix=None)
    print(f"\nfake-engine application up in {time.monotonic() - started:.1f} s")
    try:
        yield serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=APP)
    finally:
        serve.delete(APP)


def request(max_tokens: int) -> GenerationRequest:
    return GenerationRequest(request_id=str(uuid.uuid4()), owner="tests", prompt="USER: <image>\nhi ASSISTANT:",
                             image=Image.new("RGB", (8, 8)), max_tokens=max_tokens, temperature=0.0, top_p=1.0,
                             stream=True)


def test_the_injected_engine_serves_through_the_real_handle(fake_engine_app):
    async def main():
        engine = HandleEngine(fake_engine_app)
        await engine.check_health()  # Serve's controller sees the replica running
        chunks, done = await collect(engine.generate(request(6)))
        assert "".join(chunks) == "t0 t1 t2 t3 t4 t5 "  # the fake's text, not vLLM's
        assert done == Completion(num_input_tokens=600, num_output_tokens=6, finish_reason="length")

    asyncio.run(main())


def test_closing_the_stream_cancels_the_injected_engine_call(fake_engine_app):
    async def main():
        stream = HandleEngine(fake_engine_app).generate(request(2000))
        first = await anext(stream)
        assert isinstance(first, TextDelta)
        await stream.aclose()  # the caller left

    before = fake_engine_app.stats.remote().result()["cancelled"]
    asyncio.run(main())
    deadline = time.monotonic() + 10
    while fake_engine_app.stats.remote().result()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fake_engine_app.stats.remote().result()["cancelled"] == before + 1


@ray.remote(num_cpus=0)
class Ingress:
    """Stands for an ingress replica: calls the engine through a HandleEngine of its own (which gives each call
    this actor as its caller)."""

    async def generate(self, app: str, max_tokens: int) -> None:
        from PIL import Image

        from serve.app import ENGINE_DEPLOYMENT
        from serve.engine.server import HandleEngine
        from serve.engine.types import GenerationRequest, collect

        engine = HandleEngine(serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app))
        await collect(engine.generate(GenerationRequest(
            request_id="caller-dies", owner="tests", prompt="USER: <image>\nhi ASSISTANT:",
            image=Image.new("RGB", (8, 8)), max_tokens=max_tokens, temperature=0.0, top_p=1.0)))


def test_the_generations_of_an_ingress_replica_that_died_are_aborted(fake_engine_app):
    """Ray does not cancel an actor call whose caller died: the engine replica notices (CallerWatch) and aborts
    the call within engine_deployment.caller_check_s (1 s), instead of generating for nobody."""
    before = fake_engine_app.stats.remote().result()
    caller = Ingress.remote()
    caller.generate.remote(APP, 2000)  # 40 s of tokens on the fake engine
    deadline = time.monotonic() + 30
    while fake_engine_app.stats.remote().result()["requests"] == before["requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    ray.kill(caller)
    killed = time.monotonic()
    while fake_engine_app.stats.remote().result()["cancelled"] == before["cancelled"] and time.monotonic() < killed + 10:
        time.sleep(0.05)
    aborted_after = time.monotonic() - killed
    print(f"\nthe dead caller's generation aborted {aborted_after:.2f} s after its death")
    assert fake_engine_app.stats.remote().result()["cancelled"] == before["cancelled"] + 1  # not 40 s later
