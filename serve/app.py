"""Builder: config -> Ray Serve application, and running it on a local Ray."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from serve.config import ServeConfig, parse_config
from serve.deployment import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, deployment_options, ray_env
from serve.engine.server import EngineFactory, LLMServer, vllm_engine
from serve.ingress import Ingress


def engine_app(cfg: ServeConfig, engine_factory: EngineFactory = vllm_engine) -> Application:
    """The engine deployment, bound. `engine_factory` makes each replica's engine: vLLM, or a fake one
    in tests of the Serve path (docs/architecture.md, "Engine")."""
    engine = serve.deployment(LLMServer, name=ENGINE_DEPLOYMENT).options(**deployment_options(cfg)[ENGINE_DEPLOYMENT])
    return engine.bind(cfg, engine_factory)


def build_app(cfg: ServeConfig, engine_factory: EngineFactory = vllm_engine) -> Application:
    """Bind the deployments; nothing starts until the application is run."""
    opts = deployment_options(cfg)
    ingress = serve.deployment(serve.ingress()(Ingress), name=INGRESS_DEPLOYMENT).options(**opts[INGRESS_DEPLOYMENT])
    return ingress.bind(cfg, engine_app(cfg, engine_factory))


def app_builder(args: dict[str, Any]) -> Application:
    """`import_path: serve.app:app_builder` of a Serve config file, `args: {config: <a configs/*.yaml, inline>}`.

    The config is validated exactly as `llava-serve run` validates a file (env overrides included); relative
    paths in it are relative to the working directory of the Ray process that builds the application.
    """
    cfg = parse_config(args.get("config"), Path.cwd(), os.environ, "serveConfigV2 applications[].args.config")
    return build_app(cfg)


def start_local(cfg: ServeConfig) -> None:
    """Start a private local Ray, the Serve proxy on cfg.http, and the app; returns once it is healthy."""
    import ray

    from serve.telemetry import console

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = ray_env(cfg)
    if env:
        # One machine: no load balancer needs Serve's 30 s notice before a replica stops taking requests.
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "0"
    # telemetry.log_format text: the development console (serve/telemetry/console.py).
    log_format = cfg.telemetry.log_format
    env = {**console.cluster_env(log_format), **env}
    # address="local": always a fresh private cluster, never one RAY_ADDRESS points at.
    # One machine is every worker group: offer the custom resources the deployments are pinned with
    # (on KubeRay only the matching group's nodes advertise them), enough for any replica count.
    custom = {name: 10_000 for name in (*cfg.engine_deployment.resources, *cfg.ingress.resources)}
    ray.init(
        address="local", include_dashboard=False, _node_ip_address="127.0.0.1", resources=custom,
        _system_config={"metrics_report_interval_ms": int(1000 * cfg.telemetry.metrics_report_interval_s)},
        # The job's environment reaches every actor of this cluster (Serve's controller, the proxies and
        # replicas it starts) and nothing outside it: a later cluster in this process starts clean.
        runtime_env={"env_vars": env} if env else None,
        logging_level=console.driver_logging_level(log_format),
    )
    console.quiet_serve_in_driver(log_format)
    http = {"host": cfg.http.host, "port": cfg.http.port}
    if cfg.http.tls_certfile is not None:
        http.update(ssl_certfile=str(cfg.http.tls_certfile), ssl_keyfile=str(cfg.http.tls_keyfile))
    serve.start(http_options=http, logging_config=console.serve_system_logging(log_format))
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")


def drain_local(cfg: ServeConfig) -> None:
    """Delete the application gracefully: each replica finishes its in-flight requests and running jobs
    (within its deployment's graceful_shutdown_timeout_s) while the proxy still delivers their answers; what
    is queued stays in the store (docs/images.md, "Stopping")."""
    serve.delete(cfg.app_name)


def stop_local() -> None:
    """Stop the private local Ray, after Serve has deleted, gracefully, any application still running (none
    after drain_local; a failed start's, the tests' stack). Serve's controller and proxies then end with the
    cluster. Not serve.shutdown(): it waits on a call the controller answers by killing itself, which Ray
    reports on the console as an error ("Task ServeController.graceful_shutdown failed ... will be
    retried": the controller's calls are retried forever) although nothing failed."""
    import ray

    try:
        if ray.is_initialized():
            for name in serve.status().applications:
                serve.delete(name)
    finally:
        ray.shutdown()
