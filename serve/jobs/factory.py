"""`build_store`: the configured `JobStore` backend (the app's wiring; the backends know nothing of config)."""

from __future__ import annotations

import os

from serve.config import ENV_REDIS_PASSWORD, ServeConfig, StoreConfig
from serve.jobs.ray_actor import RayActorBackend
from serve.jobs.redis_store import RedisBackend
from serve.jobs.store import JobStore, StoreBackend


def build_backend(store: StoreConfig, app_name: str, max_attempts: int) -> StoreBackend:
    """The backend every replica of `app_name` shares (and the engine's autoscaling policy reads:
    serve/autoscaling.py)."""
    if store.backend == "redis":
        # The password comes from this process's environment (a Secret on Kubernetes), never from the config,
        # which the RayService holds in clear (docs/kubernetes.md).
        return RedisBackend(store.redis_url, store.result_ttl_s, max_attempts, prefix=f"llava-serve:{app_name}",
                            password=os.environ.get(ENV_REDIS_PASSWORD) or None)
    # "v4": what the store does changed (requeue: docs/faults.md; v3 kept per-key bounds); a detached actor of an
    # earlier version that a long-lived cluster still holds must not be found by name (get_if_exists).
    return RayActorBackend(f"{app_name}-jobstore-v4", store.result_ttl_s, max_attempts)


def build_store(cfg: ServeConfig) -> JobStore:
    """Every ingress replica of one deployment that calls this reaches the same state."""
    return JobStore(build_backend(cfg.store, cfg.app_name, cfg.jobs.max_attempts), away_after_s=cfg.jobs.outage_after_s)
