"""Builder: config -> Ray Serve application, and running it on a local Ray."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from serve.config import ServeConfig, parse_config
from serve.engine.server import EngineFactory, LLMServer, vllm_engine
from serve.ingress import Ingress

ENGINE_DEPLOYMENT = "LLMServer"
INGRESS_DEPLOYMENT = "Ingress"


def deployment_options(cfg: ServeConfig) -> dict[str, dict[str, Any]]:
    """Serve options per deployment name: what build_app applies, and what a Serve config file
    (KubeRay's serveConfigV2, `llava-serve render-k8s`) lists for operators to see."""
    engine = cfg.engine_deployment.serve_options()
    engine["ray_actor_options"]["runtime_env"] = {"env_vars": dict(cfg.engine.env)}
    engine["max_ongoing_requests"] = cfg.engine_max_ongoing_requests()
    ingress = cfg.ingress.serve_options()
    ingress["max_ongoing_requests"] = cfg.ingress.max_ongoing_requests
    for opts in (engine, ingress):
        # Our JSON access line (serve/telemetry/access.py) replaces Serve's own per-call line: one line
        # per request, not two, and none per engine call (loadtest/README.md: measured).
        opts["logging_config"] = {"enable_access_log": False}
    return {ENGINE_DEPLOYMENT: engine, INGRESS_DEPLOYMENT: ingress}


def ray_env(cfg: ServeConfig) -> dict[str, str]:
    """Environment every Ray process of the cluster needs for `cfg.http.proxy`. Ray reads it when its
    processes start, not from the Serve config: start_local gives it to the local cluster's processes as
    the job's environment, and k8s/rayservice.yaml lists it on every Ray container (tests/deploy checks
    they agree)."""
    if cfg.http.proxy != "haproxy":
        return {}
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # Throughput mode would route replicas' stderr through Serve's logger (a stack walk per write):
        # our JSON lines stay plain stderr lines, as with Serve's proxy.
        "RAY_SERVE_LOG_TO_STDERR": "1",
    }


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

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = ray_env(cfg)
    if env:
        # One machine: no load balancer needs Serve's 30 s notice before a replica stops taking requests.
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "0"
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
    )
    http = {"host": cfg.http.host, "port": cfg.http.port}
    if cfg.http.tls_certfile is not None:
        http.update(ssl_certfile=str(cfg.http.tls_certfile), ssl_keyfile=str(cfg.http.tls_keyfile))
    serve.start(http_options=http)
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")


def drain_local(cfg: ServeConfig) -> None:
    """Delete the application gracefully: each replica finishes its in-flight requests and running jobs
    (within its deployment's graceful_shutdown_timeout_s) while the proxy still delivers their answers; what
    is queued stays in the store (docs/images.md, "Stopping")."""
    serve.delete(cfg.app_name)


def stop_local() -> None:
    import ray

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
