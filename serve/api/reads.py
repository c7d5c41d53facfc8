"""Per-key budgets for reads: status polls, results, cancels, Eachlabs GETs, model lists, and open status
streams (docs/bounds.md, "Reads").

Reads never count against the generation limits (polling clients poll), but each costs a store round trip,
so a key gets its own generous budget for them. It is kept in each ingress replica's memory, not in the
store: checking it must cost less than the read it guards. With N ingress replicas a key can read up to N
times the budget, which bounds it just the same.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from serve.config import ReadsConfig
from serve.jobs.models import Admission, LimitExceeded


class ReadBudget:
    """A token bucket per key (`per_second`, up to `burst` saved), and a count of its open status streams."""

    def __init__(self, cfg: ReadsConfig, clock: Callable[[], float] = time.monotonic):
        self._cfg = cfg
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key name -> (tokens, when counted)
        self._streams: dict[str, int] = {}

    def take(self, owner: str) -> None:
        """Spend one read of `owner`'s budget, or raise LimitExceeded (reason "reads") spending nothing."""
        now = self._clock()
        tokens, then = self._buckets.get(owner, (float(self._cfg.burst), now))
        tokens = min(float(self._cfg.burst), tokens + (now - then) * self._cfg.per_second)
        if tokens < 1.0:
            self._buckets[owner] = (tokens, now)
            raise LimitExceeded(self._refusal("reads", (1.0 - tokens) / self._cfg.per_second))
        self._buckets[owner] = (tokens - 1.0, now)

    @contextmanager
    def status_stream(self, owner: str) -> Iterator[None]:
        """Hold one of `owner`'s status streams while the body runs; refused past `max_status_streams`."""
        if self._streams.get(owner, 0) >= self._cfg.max_status_streams:
            raise LimitExceeded(self._refusal("streams", 1.0))
        self._streams[owner] = self._streams.get(owner, 0) + 1
        try:
            yield
        finally:
            self._streams[owner] -= 1
            if not self._streams[owner]:
                del self._streams[owner]

    def _refusal(self, reason: str, retry_after_s: float) -> Admission:
        limit = self._cfg.max_status_streams if reason == "streams" else math.floor(self._cfg.per_second * 60)
        return Admission(allowed=False, reason=reason, limit=limit, max_concurrent=self._cfg.max_status_streams,
                         remaining=0, reset_s=retry_after_s, retry_after_s=retry_after_s)
