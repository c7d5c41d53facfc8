"""The engine as a Ray Serve deployment, and the handle adaptor the ingress talks to."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from serve.config import ServeConfig
from serve.engine.types import (
    Completion, EngineInputError, EngineUnavailable, GenerationRequest, ServedEngine, StartTimeout, StreamItem, coalesce,
)

EngineFactory = Callable[[ServeConfig], ServedEngine]


def vllm_engine(cfg: ServeConfig) -> ServedEngine:
    """The production engine: vLLM, with its metrics (vllm:*) through Ray's metrics export like ours
    (under Ray, vLLM's own Prometheus registry lives in the replica process and nothing scrapes it)."""
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    from serve.engine.vllm_engine import VLLMEngine

    return VLLMEngine(cfg, stat_loggers=[RayPrometheusStatLogger])


class LLMServer:
    """One engine per replica (one GPU in production). Applied as a deployment by `serve.app`, with
    vLLM by default; tests pass another factory to run the real Serve path on a fake engine."""

    def __init__(self, cfg: ServeConfig, engine_factory: EngineFactory = vllm_engine):
        self._engine = engine_factory(cfg)
        self._stream_interval_s = cfg.engine.stream_interval_s

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        async for item in coalesce(self._engine.generate(request), self._stream_interval_s):
            yield item

    async def check_health(self) -> None:
        # Serve calls this periodically: a dead engine fails it and Serve replaces the replica.
        await self._engine.check_health()

    def stats(self) -> dict[str, int]:
        return self._engine.stats()

    def __del__(self) -> None:
        # Serve calls __del__ on graceful shutdown; release the engine core and its memory.
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


class HandleEngine:
    """The `Engine` interface over a DeploymentHandle to LLMServer."""

    def __init__(self, handle):
        self._handle = handle
        self._streaming = handle.options(stream=True)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        response = self._streaming.generate.remote(request)
        finished = False
        try:
            async for item in response:
                # The completion is the stream's last item: a consumer that stops at it (collect does) ends
                # a finished call, which must not cost a cancellation round trip to the replica.
                finished = isinstance(item, Completion)
                yield item
            finished = True
        except RayTaskError as exc:
            if isinstance(exc.cause, (EngineInputError, EngineUnavailable, StartTimeout)):
                # The replica's own words, not Ray's wrapping of them (its text is the remote traceback: pids,
                # addresses, file paths), which would reach the client (docs/architecture.md, "Failures").
                raise type(exc.cause)(*exc.cause.args) from None
            raise
        except (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError) as exc:
            raise EngineUnavailable(f"no engine replica could serve the request: {type(exc).__name__}") from exc
        finally:
            # A consumer that stops early (client gone) cancels the replica's call, and with it
            # the request inside vLLM. (Cancellation of the awaiting task propagates by itself.)
            if not finished:
                response.cancel()

    async def check_health(self) -> None:
        # Ask Serve's controller, which health-checks every replica, rather than calling a replica:
        # a call would queue behind a full batch and make a busy engine look dead.
        running = await asyncio.to_thread(self._running_replicas)
        if running == 0:
            raise EngineUnavailable("no healthy engine replica")

    def _running_replicas(self) -> int:
        app = serve.status().applications.get(self._handle.app_name)
        deployment = app.deployments.get(self._handle.deployment_name) if app else None
        return deployment.replica_states.get("RUNNING", 0) if deployment else 0
