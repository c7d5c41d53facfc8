"""`build_store`: the configured `JobStore` backend (the app's wiring; the backends know nothing of config)."""

from __future__ import annotations

import os

from serve.config import ENV_REDIS_PASSWORD, ServeConfig
from serve.jobs.ray_actor import RayActorBackend
from serve.jobs.redis_store import RedisBackend
from serve.jobs.store import JobStore, StoreBackend


def build_store(cfg: ServeConfig) -> JobStore:
    """Every ingress replica of one deployment that calls this reaches the same state."""
    backend: StoreBackend
    if cfg.store.backend == "redis":
        # The password comes from this replica's environment (a Secret on Kubernetes), never from the config,
        # which the RayService holds in clear (docs/kubernetes.md).
        backend = RedisBackend(cfg.store.redis_url, cfg.store.result_ttl_s, cfg.jobs.max_attempts,
                               prefix=f"llava-serve:{cfg.app_name}",
                               password=os.environ.get(ENV_REDIS_PASSWORD) or None)
    else:
        # "v4": what the store does changed (requeue: docs/faults.md; v3 kept per-key bounds); a detached actor of an
        # earlier version that a long-lived cluster still holds must not be found by name (get_if_exists).
        backend = RayActorBackend(f"{cfg.app_name}-jobstore-v4", cfg.store.result_ttl_s, cfg.jobs.max_attempts)
    return JobStore(backend, away_after_s=cfg.jobs.outage_after_s)
