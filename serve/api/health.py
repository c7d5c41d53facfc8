"""Readiness (the engine and the job store), cached: /readyz is probed by every kubelet and load balancer, and
may be flooded by anyone who reaches the port; one check per `ingress.readiness_cache_s` answers them all
(docs/operations.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from serve.engine.types import Engine
from serve.jobs.store import JobStore


class Readiness:
    """Ready: an engine replica runs and the job store answers (without it no generation is admitted:
    docs/faults.md)."""

    def __init__(self, engine: Engine, store: JobStore | None, timeout_s: float, cache_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self._engine, self._store, self._clock = engine, store, clock
        self._timeout_s, self._cache_s = timeout_s, cache_s
        self._answer: tuple[float, str | None] | None = None  # (when, why not ready; None = ready)
        self._checking: asyncio.Task | None = None

    async def _check(self) -> str | None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._engine.check_health()
                if self._store is not None:
                    await self._store.counts()  # the cheapest read both stores have
        except Exception as exc:  # any failure to answer means not ready
            return type(exc).__name__
        finally:
            self._checking = None
        return None

    async def not_ready(self) -> str | None:
        """Why the replica is not ready (an exception's name), or None when it is."""
        if self._answer is not None and self._clock() - self._answer[0] < self._cache_s:
            return self._answer[1]
        if self._checking is None:  # probes arriving during a check wait for it instead of starting their own
            self._checking = asyncio.ensure_future(self._check())
        reason = await asyncio.shield(self._checking)
        self._answer = (self._clock(), reason)
        return reason
