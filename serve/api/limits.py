"""Per-key limits at the edge: hold a concurrency slot for a sync request, and the limit headers.

The store decides (exactly, across replicas); this module is the HTTP side of its decisions."""

from __future__ import annotations

import asyncio
import math
from contextlib import asynccontextmanager
from typing import AsyncIterator

from serve.auth import Caller
from serve.jobs.models import WINDOW_S, Admission, LimitExceeded
from serve.jobs.store import JobStore


def rate_limit_headers(adm: Admission) -> dict[str, str]:
    """X-RateLimit-* (Reset in delta seconds) and the IETF draft's fields; Retry-After on refusals."""
    reset = math.ceil(adm.reset_s)
    headers = {
        "X-RateLimit-Limit": str(adm.limit),
        "X-RateLimit-Remaining": str(adm.remaining),
        "X-RateLimit-Reset": str(reset),
        "RateLimit-Policy": f'"default";q={adm.limit};w={int(WINDOW_S)}',
        "RateLimit": f'"default";r={adm.remaining};t={reset}',
    }
    if not adm.allowed:
        headers["Retry-After"] = str(adm.retry_after)
    return headers


@asynccontextmanager
async def admitted(store: JobStore, caller: Caller, lease_s: float) -> AsyncIterator[Admission]:
    """Count a sync request against the caller's rate and hold one of its concurrency slots while
    the body runs (renewed, so a long generation keeps it; a dead replica's slot expires)."""
    adm = await store.admit(caller.name, caller.limits, lease_s)
    if not adm.allowed:
        raise LimitExceeded(adm)

    async def renew() -> None:
        while True:
            await asyncio.sleep(lease_s / 3)
            await store.renew(caller.name, adm.slot, lease_s)

    renewer = asyncio.create_task(renew())
    try:
        yield adm
    finally:
        renewer.cancel()
        await store.release(caller.name, adm.slot)
