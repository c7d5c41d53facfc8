"""The JobStore: jobs, their FIFO queue, and exact per-key limits, shared by every ingress replica.

`StoreBackend` is the store's interface: every operation one atomic step that takes the current time
as an argument (so tests inject a clock, and every backend agrees on it). Three backends implement it
with the same methods: `serve.jobs.memory.MemoryStore` (the reference semantics, in-process),
`serve.jobs.ray_actor.RayActorBackend` (that MemoryStore inside a named Ray actor: the embedded
default) and `serve.jobs.redis_store.RedisBackend` (Lua scripts). `JobStore` is the async facade the
rest of the service uses: it adds the clock and slot ids. `serve.jobs.factory.build_store` picks the
backend from the config.

Concurrency is counted in *slots*: a sync request in flight holds one, a running job holds one
(keyed by the job id). Slots are leases: a replica that dies frees its slots when they expire.

A job's full input is kept only while it is unfinished, for the runner that claims it; reads return it
abridged, and when the job ends only the abridged one is kept (docs/bounds.md, "The job store").

Leases stand still while the store is unreachable: nobody could renew them then. A replica whose store calls
went unanswered for longer than `away_after_s` says so when the store answers again (`resume`, sent by
`JobStore` before its next call), and every lease moves on by that time, so a job is not taken from a runner
that kept working through the outage (docs/faults.md, "Store unreachable").

Jobs with `notify` are announced when they end, however they end (a runner's outcome, a cancel while
queued, reap, a start deadline): the store appends them to an outbox that runners drain
(`take_finished`), so the API's executor sends its webhook even when no runner ran the job's end.
"""

from __future__ import annotations

import inspect
import time
import uuid
from typing import Any, Callable, Protocol

from serve.jobs.models import Admission, CancelOutcome, Job, JobError, JobResult, Limits


class StoreBackend(Protocol):
    """The store's operations. Each is atomic, and `now` is the only clock a backend reads."""

    async def admit(self, owner: str, limits: Limits, slot: str, lease_s: float, now: float) -> Admission:
        """A sync request: counts against the rate and takes the concurrency slot `slot`, or is refused."""

    async def renew(self, owner: str, slot: str, lease_s: float, now: float) -> bool:
        """Extend a slot's lease; False when it is gone or has lapsed (its place may be taken)."""

    async def release(self, owner: str, slot: str, now: float) -> None: ...

    async def enqueue(self, job: Job, limits: Limits, cap_pending: bool, now: float) -> Admission:
        """Accept a job (counts against the rate). With `cap_pending`, queued jobs count against the
        concurrency cap too (Eachlabs refuses an 11th unfinished prediction; fal's queue just waits). Refused
        ("pending") when the owner has `limits.max_pending` jobs queued, and ("stored") when this job's input
        would take the owner's unfinished jobs' inputs past `limits.max_stored_bytes` (docs/bounds.md)."""

    async def get(self, job_id: str, owner: str, now: float, brief: bool) -> Job | None:
        """The job with its input abridged (`abridge_long_strings`), whatever was submitted; None for an
        unknown, expired or another key's job. brief: `result` None too."""

    async def claim(self, runner: str, lease_s: float, now: float) -> Job | None:
        """The first queued job whose owner is below its concurrency cap, now running on `runner`, with its
        full input (the only read that has it). Each owner's jobs start in their queue order, so a claim looks
        at each owner's first job only: its cost grows with the owners that have queued work, never with the
        queue. Queued jobs past their start deadline are failed first, never claimed."""

    async def heartbeat(self, job_id: str, runner: str, lease_s: float, now: float) -> bool:
        """Extend the lease; False when the runner must stop (the job is no longer running on it: reaped,
        ended; or cancellation requested). A lapsed lease that reap has not acted on yet is still this
        runner's (only a reap takes a job away), so it is extended and its slot taken again, even if the
        owner's cap was filled meanwhile: the job was running all along."""

    async def log(self, job_id: str, runner: str, message: str, now: float) -> None:
        """Append a log line to a job `runner` is running (otherwise nothing)."""

    async def finish(
        self, job_id: str, runner: str, result: JobResult | None, error: JobError | None, now: float
    ) -> bool:
        """End a job with its runner's outcome; False when the job is no longer running on `runner` (reaped,
        re-queued, ended). A lapsed lease that reap has not acted on yet still counts: a runner that got its
        answer through a store outage records it instead of having the job run again."""

    async def requeue(self, job_id: str, runner: str, error: JobError, now: float) -> bool:
        """Hand back a job `runner` is running but cannot finish (the engine failed under it): what reap does
        to a lost lease, at once. Back to the front of the queue while it has attempts left, else ended with
        `error` (cancelled instead when cancellation was requested); its slot is freed either way. False,
        changing nothing, when the job is not running on `runner`."""

    async def cancel(self, job_id: str, owner: str, now: float) -> CancelOutcome: ...

    async def reap(self, now: float) -> int:
        """Recover jobs whose runner stopped renewing (each as `requeue` with WORKER_LOST: re-queued at the
        front while attempts are left, then failed), fail queued jobs past their start deadline, forget
        expired results and offer again the ends whose outbox lease ran out. Returns how many jobs changed."""

    async def take_finished(self, limit: int, lease_s: float, now: float) -> list[Job]:
        """Up to `limit` ended notify jobs, oldest end first, each handed out once and leased for `lease_s`: one
        whose delivery is not over by then (`notified`: its deliverer died) is offered again by `reap`, at the
        front. Forgotten ones skipped."""

    async def notified(self, job_id: str, now: float) -> None:
        """The delivery of a job's end is over (acknowledged, or given up): its outbox lease goes."""

    async def renotify(self, job_id: str, now: float) -> None:
        """Offer an ended job's end again at once (its delivery was cut short by a stopping replica)."""

    async def counts(self, now: float) -> dict[str, int]:
        """Jobs queued and running, all owners (for the metrics)."""

    async def startable(self, now: float) -> int:
        """Queued jobs that could start now: each owner's queued jobs, up to the room its concurrency cap leaves
        (the cap of its first queued job, as `claim` reads it). The demand an engine replica more could serve;
        jobs queued behind their key's cap are not (the engine's autoscaling policy: docs/autoscaling.md)."""

    async def resume(self, since: float, now: float) -> None:
        """A caller could not reach the store from `since` until `now`: nobody could renew a lease meanwhile, so
        every lease (running jobs', slots') moves on by that time, less what an earlier `resume` already covered
        (every replica that lived through an outage reports it; it counts once)."""

    async def wait_for_work(self, seen: int, timeout_s: float, now: float) -> int:
        """The store's work counter, once it differs from `seen`, or after `timeout_s`. It moves whenever
        queued work may have become claimable (a job queued or re-queued, or a slot freed while jobs
        wait): idle runners wait here instead of polling `claim` (the only operation that awaits)."""


# The operations' names, in the order above (the backends' conformance test walks them).
STORE_OPERATIONS: tuple[str, ...] = tuple(
    name for name, member in vars(StoreBackend).items() if inspect.iscoroutinefunction(member))


class JobStore:
    """away_after_s: how long this replica's calls may go unanswered before it tells the store it was away
    (`resume`); None never does (tools and tests that move the clock by hand)."""

    def __init__(self, backend: StoreBackend, clock: Callable[[], float] = time.time,
                 away_after_s: float | None = None):
        self._backend = backend
        self._clock = clock
        self._away_after_s = away_after_s
        self._answered: float | None = None  # the latest time a call of ours was sent at and answered

    async def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """Run one operation at the current time. After an outage (nothing answered for away_after_s: the
        runner calls every reap_interval_s), `resume` goes first. A call sent before a freeze and answered after
        it counts from when it was sent, as the store saw it."""
        now = self._clock()
        answered = self._answered
        if self._away_after_s is not None and answered is not None and now - answered > self._away_after_s:
            await self._backend.resume(answered, now)
        result = await getattr(self._backend, op)(*args, now, **kwargs)
        self._answered = max(self._answered or now, now)
        return result

    async def admit(self, owner: str, limits: Limits, lease_s: float) -> Admission:
        return await self._call("admit", owner, limits, uuid.uuid4().hex, lease_s)

    async def renew(self, owner: str, slot: str, lease_s: float) -> bool:
        return await self._call("renew", owner, slot, lease_s)

    async def release(self, owner: str, slot: str) -> None:
        await self._call("release", owner, slot)

    async def enqueue(self, job: Job, limits: Limits, *, cap_pending: bool) -> Admission:
        return await self._call("enqueue", job, limits, cap_pending)

    async def get(self, job_id: str, owner: str, *, brief: bool = False) -> Job | None:
        """The job with its input abridged, or None for an unknown id or another key's job. brief: without
        the result too (it grows with the answer), for status polls."""
        return await self._call("get", job_id, owner, brief=brief)

    async def claim(self, runner: str, lease_s: float) -> Job | None:
        return await self._call("claim", runner, lease_s)

    async def heartbeat(self, job_id: str, runner: str, lease_s: float) -> bool:
        return await self._call("heartbeat", job_id, runner, lease_s)

    async def log(self, job_id: str, runner: str, message: str) -> None:
        await self._call("log", job_id, runner, message)

    async def finish(
        self, job_id: str, runner: str, *, result: JobResult | None = None, error: JobError | None = None
    ) -> bool:
        return await self._call("finish", job_id, runner, result, error)

    async def requeue(self, job_id: str, runner: str, error: JobError) -> bool:
        return await self._call("requeue", job_id, runner, error)

    async def cancel(self, job_id: str, owner: str) -> CancelOutcome:
        return await self._call("cancel", job_id, owner)

    async def reap(self) -> int:
        return await self._call("reap")

    async def take_finished(self, lease_s: float, limit: int = 100) -> list[Job]:
        return await self._call("take_finished", limit, lease_s)

    async def notified(self, job_id: str) -> None:
        await self._call("notified", job_id)

    async def renotify(self, job_id: str) -> None:
        await self._call("renotify", job_id)

    async def counts(self) -> dict[str, int]:
        return await self._call("counts")

    async def startable(self) -> int:
        return await self._call("startable")

    async def wait_for_work(self, seen: int, timeout_s: float) -> int:
        return await self._call("wait_for_work", seen, timeout_s)

    async def aclose(self) -> None:
        """Close the backend's connections, where it holds any (Redis)."""
        close = getattr(self._backend, "aclose", None)
        if close is not None:
            await close()
