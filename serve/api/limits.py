"""Per-key limits at the edge: hold a concurrency slot for a sync request, and the limit headers.

The store decides (exactly, across replicas); this module is the HTTP side of its decisions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from contextlib import asynccontextmanager
from typing import AsyncIterator

from serve.auth import Caller
from serve.jobs.models import WINDOW_S, Admission, LimitExceeded, StoreUnavailable
from serve.jobs.store import JobStore


log = logging.getLogger(__name__)

RENEW_RETRY_S = 0.5  # how soon a sync request's slot renewal is tried again after a store error

# Refusals by the read budget (serve/api/reads.py): the generation window's headers do not describe them.
READ_REASONS = ("reads", "streams")


def refusal_detail(adm: Admission) -> str | None:
    """Plain words for a refusal by one of the bounds every API shares (docs/bounds.md); None for the rate
    and concurrency limits, which each API words in its own way."""
    return {
        "pending": "Too many of this key's requests are waiting in the queue. Please retry when some have started.",
        "stored": "This key's waiting requests already hold as many bytes as it may store. Send images by URL, or "
                  "retry when some have finished.",
        "reads": f"Too many status reads for this key. Please retry after {adm.retry_after} seconds.",
        "streams": f"Too many open status streams for this key (limit {adm.limit}). Close one, or poll the status.",
    }.get(adm.reason or "")


def rate_limit_headers(adm: Admission) -> dict[str, str]:
    """X-RateLimit-* (Reset in delta seconds) and the IETF draft's fields; Retry-After on refusals."""
    if adm.reason in READ_REASONS:
        return {"Retry-After": str(adm.retry_after)}
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
        # Through a store outage the slot is renewed again as soon as the store answers: its lease stands
        # still meanwhile (docs/faults.md), so the request goes on. Any other failure is retried too: a renewer
        # that died would let the slot lapse under a running request, and the key exceed its cap.
        while True:
            await asyncio.sleep(lease_s / 3)
            while True:
                try:
                    await store.renew(caller.name, adm.slot, lease_s)
                    break
                except StoreUnavailable:
                    pass
                except Exception:
                    log.exception("renewing the concurrency slot of a %s request failed; retrying", caller.name)
                await asyncio.sleep(min(RENEW_RETRY_S, lease_s / 10))

    renewer = asyncio.create_task(renew())
    try:
        yield adm
    finally:
        renewer.cancel()
        with contextlib.suppress(StoreUnavailable):  # unreleased, the slot lapses with its lease
            await store.release(caller.name, adm.slot)
