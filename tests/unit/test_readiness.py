"""/readyz: one engine health check per readiness_cache_s answers every probe (a flood of probes cannot
keep the engine's controller busy), and the answer follows the engine once the cache expires."""

import asyncio

from fastapi.testclient import TestClient

from serve.api.health import Readiness
from serve.config import load_config
from serve.ingress import create_app
from serve.jobs.models import StoreUnavailable
from tests.conftest import CONFIGS
from tests.fakes import FakeEngine, make_services


class CountingEngine(FakeEngine):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.checks = 0

    async def check_health(self) -> None:
        self.checks += 1
        await asyncio.sleep(0.05)
        await super().check_health()


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_concurrent_probes_share_one_check_and_the_answer_is_reused_for_the_interval():
    engine, clock = CountingEngine(), Clock()
    readiness = Readiness(engine, None, timeout_s=5, cache_s=1.0, clock=clock)
    assert await asyncio.gather(*(readiness.not_ready() for _ in range(50))) == [None] * 50
    assert engine.checks == 1
    engine.healthy = False
    clock.now = 0.9
    assert await readiness.not_ready() is None and engine.checks == 1
    clock.now = 1.0
    assert await readiness.not_ready() is not None and engine.checks == 2


async def test_a_check_past_its_timeout_is_not_ready():
    class Hung(FakeEngine):
        async def check_health(self) -> None:
            await asyncio.sleep(10)

    assert await Readiness(Hung(), None, timeout_s=0.05, cache_s=0).not_ready() == "TimeoutError"


async def test_a_store_that_does_not_answer_is_not_ready():
    class Down:
        async def counts(self):
            raise StoreUnavailable("job store unavailable: ConnectionError")

    assert await Readiness(FakeEngine(), Down(), timeout_s=1, cache_s=0).not_ready() == "StoreUnavailable"


def test_metrics_are_not_on_the_api_port_unless_asked():
    services = make_services(FakeEngine())
    assert services.config.telemetry.metrics_route  # the embedded default (local-cpu.yaml) asks
    services.config = services.config.model_copy(
        update={"telemetry": services.config.telemetry.model_copy(update={"metrics_route": False})}
    )
    assert TestClient(create_app(services)).get("/metrics").status_code == 404
    keys = {"LLAVA_SERVE_KEYS_FILE": str(CONFIGS / "keys.local.yaml")}
    prod = load_config(CONFIGS / "llava-1.5-13b-l40s.yaml", env=keys)
    assert not prod.telemetry.metrics_route
