"""The engine as a Ray Serve deployment, and the handle adaptor the ingress talks to."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Callable, Iterator

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from serve.config import ServeConfig
from serve.engine.types import (
    Completion, EngineInputError, EngineUnavailable, EngineWaking, GenerationRequest, ServedEngine, StartTimeout,
    StreamItem, coalesce,
)

EngineFactory = Callable[[ServeConfig], ServedEngine]

log = logging.getLogger(__name__)


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
        self._callers = CallerWatch(cfg.engine_deployment.caller_check_s)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        with self._callers.watching(request.caller):
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


class CallerWatch:
    """Cancels the calls of a caller (an ingress replica) that died. Ray does not cancel an actor call whose caller
    died, so without this the engine would run a dead ingress replica's generations to their end for nobody, while
    their jobs run again elsewhere (docs/faults.md, "Ingress replica dies"). Each distinct caller is asked every
    `period_s` whether it lives (Ray's built-in `__ray_ready__`); its death cancels its calls' tasks, which aborts
    their requests in vLLM."""

    def __init__(self, period_s: float):
        self._period_s = period_s
        self._calls: dict[str, tuple[Any, set[asyncio.Task]]] = {}  # caller's actor id -> (handle, its calls)
        self._watcher: asyncio.Task | None = None

    @contextlib.contextmanager
    def watching(self, caller: Any) -> Iterator[None]:
        if caller is None:  # not called by an ingress replica (tools, tests)
            yield
            return
        key, task = caller._actor_id.hex(), asyncio.current_task()
        self._calls.setdefault(key, (caller, set()))[1].add(task)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        try:
            yield
        finally:
            tasks = self._calls.get(key, (None, set()))[1]
            tasks.discard(task)
            if not tasks:
                self._calls.pop(key, None)

    async def _watch(self) -> None:
        while self._calls:
            await asyncio.sleep(self._period_s)
            for key, (caller, tasks) in list(self._calls.items()):
                try:
                    async with asyncio.timeout(self._period_s):
                        await caller.__ray_ready__.remote()
                except RayActorError:
                    log.warning("engine: the ingress replica %s died; aborting its %d generation(s)", key, len(tasks))
                    for task in list(tasks):
                        task.cancel()
                    self._calls.pop(key, None)
                except Exception:  # busy, or slow to answer: not known to be dead
                    continue


def _own_actor() -> Any:
    """This process's actor handle, or None outside a Ray actor."""
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return ray.get_runtime_context().current_actor


# How long the count of running engine replicas is reused when the engine may rest at 0 (`HandleEngine.awake`).
AWAKE_CACHE_S = 1.0
# Deployment states in which no replica will serve until someone intervenes (Serve's DeploymentStatus).
_BROKEN = ("UNHEALTHY", "DEPLOY_FAILED")


class HandleEngine:
    """The `Engine` interface over a DeploymentHandle to LLMServer. `cold_start_wait_s`, set when the engine may
    rest at 0 replicas (docs/autoscaling.md): how long a call made while none runs waits for one to start."""

    def __init__(self, handle, cold_start_wait_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self._handle = handle
        self._streaming = handle.options(stream=True)
        self._lost = False  # a replica died under a call, and no replica has answered one since
        # This replica's own actor, which each call carries: the engine aborts the calls of a caller that died.
        self._caller = _own_actor()
        self._cold_start_wait_s, self._clock = cold_start_wait_s, clock
        self._state: tuple[float, tuple[str, int]] | None = None  # (when, the deployment's state) for awake()

    async def awake(self) -> bool:
        """Whether an engine replica runs (always, for an engine that never rests). While none does, the job
        runners claim nothing: queued jobs stay queued, where the autoscaling policy counts them and starts one."""
        if self._cold_start_wait_s is None:
            return True
        return (await self._deployment_state())[1] > 0

    async def _deployment_state(self) -> tuple[str, int]:
        """(status, running replicas) of the engine deployment, from Serve's controller, reused AWAKE_CACHE_S."""
        if self._state is None or self._clock() - self._state[0] >= AWAKE_CACHE_S:
            self._state = (self._clock(), await asyncio.to_thread(self._ask_controller))
        return self._state[1]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        if self._caller is not None:
            request = dataclasses.replace(request, caller=self._caller)
        # At rest, the call itself starts a replica (Serve's controller starts one for a call waiting at 0);
        # its first item is waited for at most cold_start_wait_s, then the caller is told when to retry.
        waking = not await self.awake()
        response = self._streaming.generate.remote(request)
        finished = False
        try:
            if waking:
                try:
                    first = await asyncio.wait_for(anext(response), self._cold_start_wait_s)
                except TimeoutError:
                    raise EngineWaking(f"the engine is starting (none ran; waited {self._cold_start_wait_s:g} s)",
                                       retry_after_s=self._cold_start_wait_s) from None
                finished = isinstance(first, Completion)
                yield first
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
            self._lost = self._lost or isinstance(exc, RayActorError)
            raise EngineUnavailable(f"no engine replica could serve the request: {type(exc).__name__}") from exc
        finally:
            # A consumer that stops early (client gone) cancels the replica's call, and with it
            # the request inside vLLM. (Cancellation of the awaiting task propagates by itself.)
            if not finished:
                response.cancel()

    async def check_health(self) -> None:
        if self._cold_start_wait_s is not None:
            # May rest at 0: ready whether a replica runs or not (queue jobs are taken and wait; sync requests
            # wake it), unless the deployment is broken. Never a call to a replica, which would wake it.
            status, _ = await self._deployment_state()
            if status in _BROKEN:
                raise EngineUnavailable(f"the engine deployment is {status}")
            return
        if self._lost:
            # A replica died under a call: the controller counts it as running until its next health check (up
            # to health_check_period_s + timeout), so ask a replica itself until one answers (docs/faults.md).
            try:
                await self._handle.check_health.remote()
            except Exception as exc:
                raise EngineUnavailable(f"the engine replica died; none answers yet: {type(exc).__name__}") from None
            self._lost = False
        # Ask Serve's controller, which health-checks every replica, rather than calling a replica:
        # a call would queue behind a full batch and make a busy engine look dead.
        _, running = await asyncio.to_thread(self._ask_controller)
        if running == 0:
            raise EngineUnavailable("no healthy engine replica")

    def _ask_controller(self) -> tuple[str, int]:
        app = serve.status().applications.get(self._handle.app_name)
        deployment = app.deployments.get(self._handle.deployment_name) if app else None
        if deployment is None:
            return "NOT_FOUND", 0
        return getattr(deployment.status, "value", str(deployment.status)), deployment.replica_states.get("RUNNING", 0)
