"""A fake engine for unit tests of the ingress (never the only test of a path)."""

from __future__ import annotations

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
        words = [f"w{i} " for i in range(request.max_tokens)]
        for w in words:
            yield TextDelta(text=w, num_tokens=1)
        yield Completion(num_input_tokens=600, num_output_tokens=len(words), finish_reason="length")

    async def check_health(self) -> None:
        if not self.healthy:
            raise EngineUnavailable("fake engine is down")
