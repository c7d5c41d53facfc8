"""The engine deployment's autoscaling policy: queued jobs count as demand (docs/autoscaling.md).

Serve's own policy sees the requests its handles send and its replicas hold. Queue jobs (fal queue, Eachlabs
predictions) wait in the job store until an ingress replica's runner claims them, so a backlog there is
invisible to it: one ingress replica with a full runner and 500 jobs queued looks like 64 requests. This
policy adds the store's startable jobs (queued, within their key's concurrency cap: a job queued behind its
key's cap gains nothing from another replica) to Serve's count and asks for one replica per
`autoscaling.target_ongoing_requests` of the sum; Serve then applies the bounds and the upscale, downscale
and downscale-to-zero delays. It is also what starts a resting engine (min_replicas 0): the runners claim
nothing while no engine replica runs (serve/engine/server.py, `HandleEngine.awake`), so queued jobs stay
queued, are counted here, and bring a replica up.

Serve runs the policy in its controller's event loop every 0.1 s, where nothing may block: the store is read
by a one-shot task every `engine_deployment.queue_poll_s`, and each decision uses the latest figure. The
policy is named in the engine's Serve options (serve/deployment.py) and imported by that name in the
controller, so it needs the `serve` package installed on the head node (the images have it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from serve.config import StoreConfig

log = logging.getLogger(__name__)


def desired_replicas(requests: float, queued_jobs: int, per_replica: float) -> int:
    """Replicas for `requests` (Serve's count: running and waiting in its routers) plus `queued_jobs` (the
    store's), at `per_replica` each; 0 when there is nothing. Serve clamps it to the bounds."""
    return math.ceil((requests + queued_jobs) / per_replica)


class QueueAwarePolicy:
    """`autoscaling_config.policy.policy_function` of the engine deployment (Serve makes one per deployment); its
    arguments are serve/deployment.py's `engine_policy`."""

    def __init__(self, store: dict[str, Any], app_name: str, max_attempts: int, poll_s: float):
        self._store = (StoreConfig(**store), app_name, max_attempts)
        self._poll_s = poll_s
        self._backend: Any = None
        self._queued = 0  # the latest figure read; kept while the store does not answer (no scale-down on a blip)
        self._polled_at = -math.inf
        self._poll: asyncio.Task | None = None
        self._failing = False

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = time.monotonic()
        if (self._poll is None or self._poll.done()) and now - self._polled_at >= self._poll_s:
            self._polled_at = now
            self._poll = asyncio.get_running_loop().create_task(self._read_queue())
        wanted = desired_replicas(ctx.total_num_requests, self._queued, ctx.config.get_target_ongoing_requests())
        return wanted, {"queued_jobs": self._queued}

    async def _read_queue(self) -> None:
        from serve.jobs.factory import build_backend

        try:
            if self._backend is None:
                # Finding the store actor by name asks Ray's GCS: off the controller's loop.
                self._backend = await asyncio.to_thread(build_backend, *self._store)
            self._queued = await self._backend.startable(time.time())
        except Exception as exc:
            if not self._failing:
                log.warning("autoscaling: the job store's queue could not be read (%s); deciding on the last "
                            "figure, %d queued job(s), until it can", type(exc).__name__, self._queued)
            self._failing = True
        else:
            if self._failing:
                log.warning("autoscaling: the job store's queue is read again (%d queued job(s))", self._queued)
            self._failing = False
