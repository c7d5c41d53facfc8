"""Builder: config -> Ray Serve application, and running it on a local Ray."""

from __future__ import annotations

import os

from ray import serve
from ray.serve import Application

from serve.config import ServeConfig
from serve.engine.server import LLMServer
from serve.ingress import Ingress

ENGINE_DEPLOYMENT = "LLMServer"
INGRESS_DEPLOYMENT = "Ingress"


def build_app(cfg: ServeConfig) -> Application:
    """Bind the deployments; nothing starts until the application is run."""
    engine_opts = cfg.engine_deployment.serve_options()
    engine_opts["ray_actor_options"]["runtime_env"] = {"env_vars": dict(cfg.engine.env)}
    engine = serve.deployment(LLMServer, name=ENGINE_DEPLOYMENT).options(
        max_ongoing_requests=cfg.engine_max_ongoing_requests(), **engine_opts
    )
    ingress = serve.deployment(serve.ingress()(Ingress), name=INGRESS_DEPLOYMENT).options(
        max_ongoing_requests=cfg.ingress.max_ongoing_requests, **cfg.ingress.serve_options()
    )
    return ingress.bind(cfg, engine.bind(cfg))


def start_local(cfg: ServeConfig) -> None:
    """Start a private local Ray, the Serve proxy on cfg.http, and the app; returns once it is healthy."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # address="local": always a fresh private cluster, never one RAY_ADDRESS points at.
    ray.init(
        address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
        _system_config={"metrics_report_interval_ms": int(1000 * cfg.telemetry.metrics_report_interval_s)},
    )
    http = {"host": cfg.http.host, "port": cfg.http.port}
    if cfg.http.tls_certfile is not None:
        http.update(ssl_certfile=str(cfg.http.tls_certfile), ssl_keyfile=str(cfg.http.tls_keyfile))
    serve.start(http_options=http)
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")


def stop_local() -> None:
    import ray

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
