"""What a config asks of Ray, as plain data: each deployment's Serve options and the Ray processes'
environment. Pure functions of the config, free of Ray and vLLM, so `llava-serve render-k8s` (serve/k8s.py,
`make k8s`) runs from a venv with only the config's dependencies; serve/app.py applies the same options
when it binds the application."""

from __future__ import annotations

from typing import Any

from serve.config import ServeConfig

ENGINE_DEPLOYMENT = "LLMServer"
INGRESS_DEPLOYMENT = "Ingress"
# The engine's autoscaling policy, imported by Serve's controller by this name (docs/autoscaling.md).
ENGINE_POLICY = "serve.autoscaling:QueueAwarePolicy"


def deployment_options(cfg: ServeConfig) -> dict[str, dict[str, Any]]:
    """Serve options per deployment name: what build_app applies, and what a Serve config file
    (KubeRay's serveConfigV2, `llava-serve render-k8s`) lists for operators to see."""
    engine = cfg.engine_deployment.serve_options()
    engine["ray_actor_options"]["runtime_env"] = {"env_vars": dict(cfg.engine.env)}
    engine["max_ongoing_requests"] = cfg.engine_max_ongoing_requests()
    if "autoscaling_config" in engine:
        # Queued jobs count as demand too (docs/autoscaling.md): the store's queue is invisible to Serve.
        engine["autoscaling_config"]["policy"] = engine_policy(cfg)
    ingress = cfg.ingress.serve_options()
    ingress["max_ongoing_requests"] = cfg.ingress.max_ongoing_requests
    for opts in (engine, ingress):
        # Our JSON access line (serve/telemetry/access.py) replaces Serve's own per-call line: one line
        # per request, not two, and none per engine call (loadtest/README.md: measured).
        opts["logging_config"] = {"enable_access_log": False}
        if cfg.telemetry.log_format == "text":
            # The development console (serve/telemetry/console.py): the replicas' Serve INFO lines stay off it.
            opts["logging_config"]["log_level"] = "WARNING"
    return {ENGINE_DEPLOYMENT: engine, INGRESS_DEPLOYMENT: ingress}


def engine_policy(cfg: ServeConfig) -> dict[str, Any]:
    """The engine's `autoscaling_config.policy`: the policy, and what it needs to read the store, as JSON."""
    return {
        "policy_function": ENGINE_POLICY,
        "policy_kwargs": {
            "store": cfg.store.model_dump(mode="json"),
            "app_name": cfg.app_name,
            "max_attempts": cfg.jobs.max_attempts,
            "poll_s": cfg.engine_deployment.queue_poll_s,
        },
    }


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
        # Throughput mode sends a request to the engine replica by gRPC in one message, whose default cap
        # (4 MiB) a full-HD photo's decoded pixels exceed: room for the largest image the intake admits and
        # for all the rest of a request, which a body bounds (docs/architecture.md, "Engine").
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(3 * cfg.media.max_image_pixels + cfg.http.max_body_bytes),
    }
