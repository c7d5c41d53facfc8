"""A fake engine for unit tests of the ingress (never the only test of a path)."""

from __future__ import annotations

import asyncio

from serve.engine.types import Completion, EngineUnavailable, GenerationRequest, TextDelta


class FakeEngine:
    def __init__(self, fail_with: Exception | None = None, healthy: bool = True):
        self.fail_with = fail_with
        self.healthy = healthy
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest):
        self.requests.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        words = [f"w{i} " for i in range(request.max_tokens or 16)]
        for w in words:
            yield TextDelta(text=w, num_tokens=1)
        yield Completion(num_input_tokens=600, num_output_tokens=len(words), finish_reason="length")

    async def check_health(self) -> None:
        if not self.healthy:
            raise EngineUnavailable("fake engine is down")


class SlowEngine(FakeEngine):
    """Yields one token per `delay` seconds: long enough to hold slots, cancellable mid-stream."""

    def __init__(self, delay: float = 0.05):
        super().__init__()
        self.delay = delay
        self.cancelled = 0

    async def generate(self, request: GenerationRequest):
        self.requests.append(request)
        try:
            for i in range(request.max_tokens or 16):
                await asyncio.sleep(self.delay)
                yield TextDelta(text=f"t{i} ", num_tokens=1)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        yield Completion(num_input_tokens=600, num_output_tokens=request.max_tokens or 16, finish_reason="length")


def make_services(engine, keys_file=None, backend=None, away_after_s=None):
    """The ingress' services on the embedded default config, with an in-process store by default (away_after_s:
    `JobStore`'s)."""
    from serve.api.services import Services
    from serve.config import load_config
    from serve.jobs.memory import MemoryStore
    from serve.jobs.store import JobStore
    from tests.conftest import CONFIGS

    env = {"LLAVA_SERVE_KEYS_FILE": str(keys_file)} if keys_file else {}
    cfg = load_config(CONFIGS / "local-cpu.yaml", env=env)
    store = JobStore(backend or MemoryStore(cfg.store.result_ttl_s, cfg.jobs.max_attempts), away_after_s=away_after_s)
    return Services.build(cfg, engine, store)


class ServedFakeEngine(SlowEngine):
    """What the engine deployment runs (a `ServedEngine`): the slow fake, with counters and shutdown."""

    def stats(self) -> dict[str, int]:
        return {"requests": len(self.requests), "cancelled": self.cancelled}

    def shutdown(self) -> None:
        pass


def served_fake_engine(cfg) -> ServedFakeEngine:
    """An `EngineFactory` for `serve.app.engine_app` / `build_app`: the fake in place of vLLM."""
    return ServedFakeEngine(delay=0.02)
