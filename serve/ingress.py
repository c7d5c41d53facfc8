"""The HTTP ingress: one FastAPI app (built by `create_app`) served by a Ray Serve deployment."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve

from serve.api.context import RequestContextMiddleware
from serve.api.eachlabs.routes import router as eachlabs_router
from serve.api.eachlabs.serving import EachlabsExecutor
from serve.api.fal.dispatch import FalDispatch
from serve.api.fal.routes import router as fal_router
from serve.api.fal.serving import FalExecutor
from serve.api.health import Readiness
from serve.api.openai.routes import SDK_HEADERS as OPENAI_SDK_HEADERS
from serve.api.openai.routes import router as openai_router
from serve.api.reference import mount as mount_reference
from serve.api.services import Services
from serve.config import ServeConfig
from serve.engine.server import HandleEngine
from serve.jobs.factory import build_store
from serve.jobs.runner import JobRunner, drain_budget_s
from serve.telemetry.access import configure_logging
from serve.telemetry.metrics import node_metrics


def create_app(services: Services, runner: JobRunner | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if runner is not None:
            runner.start()
        try:
            yield
        finally:
            if runner is not None:
                # Serve runs this after the replica's HTTP drain; the jobs it runs get what is left of the grace.
                await runner.stop(drain_budget_s(services.config.ingress.graceful_shutdown_timeout_s))
            await services.aclose()

    app = FastAPI(title="llava-serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.services = services

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    ingress = services.config.ingress
    readiness = Readiness(services.engine, services.store, ingress.readiness_timeout_s, ingress.readiness_cache_s)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        reason = await readiness.not_ready()
        if reason is not None:
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def prometheus() -> Response:
        import ray

        if not ray.is_initialized():
            return JSONResponse({"detail": "Metrics are exported through Ray, which is not running here."}, 503)
        try:
            text = await node_metrics()
        except Exception as exc:  # the node's metrics agent is not up (yet)
            return JSONResponse({"detail": f"The Ray metrics agent did not answer: {type(exc).__name__}"}, 503)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    if services.config.telemetry.metrics_route:  # off in production: the series name every key
        app.add_api_route("/metrics", prometheus, methods=["GET"])

    app.include_router(fal_router)
    app.include_router(openai_router)  # before Eachlabs': its /v1/{rest} answers every other /v1 path
    app.include_router(eachlabs_router)
    mount_reference(app, services.config)  # /openapi.json and /docs, unless http.reference is off (docs/api.md §9)
    # Middleware added last runs first: context (outermost), CORS, then fal's dispatch (innermost).
    app.add_middleware(FalDispatch)
    # Browsers only (docs/api.md §1.4): it answers preflights before any dispatch.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["*"],
        # By name: Starlette reads a header list literally ("x-fal-*" would match no header). What fal's JS
        # client and OpenAI's Node SDK (dangerouslyAllowBrowser) send besides the usual ones.
        allow_headers=["authorization", "content-type", "accept", "x-api-key", "x-fal-target-url",
                       "x-fal-queue-priority", "x-fal-runner-hint", "x-fal-request-timeout",
                       "x-fal-object-lifecycle-preference", *OPENAI_SDK_HEADERS],
        expose_headers=["x-fal-request-id", "x-request-id", "retry-after", "x-ratelimit-limit",
                        "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit", "ratelimit-policy"],
    )
    # Every request's id, API, operation and key (telemetry); polls unlogged unless asked (the default).
    app.add_middleware(RequestContextMiddleware, log_polls=services.config.telemetry.log_polls)
    return app


class Ingress:
    """Applied as a Serve deployment by `serve.app`; `serve.ingress()` calls the builder below."""

    def __init__(self, cfg: ServeConfig, llm_handle):
        configure_logging(cfg.telemetry.log_level, cfg.telemetry.log_format)
        resting = cfg.engine_deployment.cold_start_wait_s if cfg.engine_deployment.rests() else None
        self._engine = HandleEngine(llm_handle, resting)
        self._services = Services.build(cfg, self._engine, build_store(cfg))
        # The replica's id is also its actor's name: a job's runner ("<replica id>#<claim>") names the replica
        # running it.
        self._runner_id = serve.get_replica_context().replica_id.to_full_id_str()

    def __serve_build_asgi_app__(self) -> FastAPI:
        executors = {"fal": FalExecutor(self._services), "eachlabs": EachlabsExecutor(self._services)}
        runner = JobRunner(self._services.store, self._runner_id, executors, self._services.config.jobs,
                           engine_awake=self._engine.awake)
        return create_app(self._services, runner)
