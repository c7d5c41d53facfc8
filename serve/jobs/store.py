"""The JobStore: jobs, their FIFO queue, and exact per-key limits, shared by every ingress replica.

`MemoryStore` is the reference semantics: synchronous, every operation one atomic step that takes
the current time as an argument (so tests inject a clock, and every backend agrees on it).
Backends run those same operations somewhere shared — inside a named Ray actor (the embedded
default; one actor serialises all calls) or in Redis (Lua scripts, `serve.jobs.redis_store`) — and
`JobStore` is the async facade the rest of the service uses.

Concurrency is counted in *slots*: a sync request in flight holds one, a running job holds one
(keyed by the job id). Slots are leases: a replica that dies frees its slots when they expire.

Jobs with `notify` are announced when they end, however they end (a runner's outcome, a cancel while
queued, reap, a start deadline): the store appends them to an outbox that runners drain
(`take_finished`), so the API's executor sends its webhook even when no runner ran the job's end.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict, deque
from typing import Any, Callable, Protocol

from serve.config import ServeConfig
from serve.jobs.models import (
    CANCELLED,
    START_TIMEOUT,
    WINDOW_S,
    Admission,
    CancelOutcome,
    Job,
    JobError,
    JobResult,
    JobStatus,
    Limits,
    LogLine,
    final_status,
)

WORKER_LOST = "The worker running this request stopped responding; it could not be completed."


class StoreUnavailable(RuntimeError):
    """The shared store cannot be reached. Backends raise it for their connection failures so
    callers answer 503, not 500; an operation whose reply was lost may have been applied (once)."""


class MemoryStore:
    def __init__(self, result_ttl_s: float, max_attempts: int):
        self._ttl = result_ttl_s
        self._max_attempts = max_attempts
        self._jobs: dict[str, Job] = {}
        self._queue: OrderedDict[str, None] = OrderedDict()  # queued job ids, FIFO
        self._windows: dict[str, deque[float]] = {}  # owner -> admission times in the window
        self._slots: dict[str, dict[str, float]] = {}  # owner -> slot id -> lease expiry
        self._finished: deque[str] = deque()  # the outbox: ended notify jobs not yet handed out, FIFO

    # -- limits ---------------------------------------------------------------------------

    def _prune(self, owner: str, now: float) -> tuple[deque[float], dict[str, float]]:
        window = self._windows.setdefault(owner, deque())
        while window and window[0] <= now - WINDOW_S:
            window.popleft()
        slots = self._slots.setdefault(owner, {})
        for slot in [s for s, until in slots.items() if until <= now]:
            del slots[slot]
        return window, slots

    def _decision(self, owner: str, limits: Limits, now: float, in_flight_extra: int | None) -> Admission:
        """Admit (recording the time in the window) or refuse (recording nothing). `in_flight_extra`:
        work counted against the concurrency cap beyond the slots; None = no concurrency check."""
        window, slots = self._prune(owner, now)
        reset_s = window[0] + WINDOW_S - now if window else 0.0
        base = {"limit": limits.rate_per_minute, "max_concurrent": limits.max_concurrent,
                "remaining": max(0, limits.rate_per_minute - len(window)), "reset_s": reset_s}
        if len(window) >= limits.rate_per_minute:
            return Admission(allowed=False, reason="rate", retry_after_s=reset_s, **base)
        if in_flight_extra is not None and len(slots) + in_flight_extra >= limits.max_concurrent:
            return Admission(allowed=False, reason="concurrency", retry_after_s=1.0, **base)
        window.append(now)
        base["remaining"] -= 1
        base["reset_s"] = window[0] + WINDOW_S - now
        return Admission(allowed=True, **base)

    def admit(self, owner: str, limits: Limits, slot: str, lease_s: float, now: float) -> Admission:
        """A sync request: counts against the rate and takes a concurrency slot, or is refused."""
        decision = self._decision(owner, limits, now, in_flight_extra=0)
        if decision.allowed:
            self._slots[owner][slot] = now + lease_s
            decision.slot = slot
        return decision

    def renew(self, owner: str, slot: str, lease_s: float, now: float) -> bool:
        slots = self._slots.get(owner, {})
        if slots.get(slot, now) <= now:  # gone, or lapsed: its place may be someone else's now
            slots.pop(slot, None)
            return False
        slots[slot] = now + lease_s
        return True

    def release(self, owner: str, slot: str, now: float) -> None:
        self._slots.get(owner, {}).pop(slot, None)

    # -- jobs -----------------------------------------------------------------------------

    def enqueue(self, job: Job, limits: Limits, cap_pending: bool, now: float) -> Admission:
        """Accept a job (counts against the rate). With `cap_pending`, queued jobs count against the
        concurrency cap too (Eachlabs refuses an 11th unfinished prediction; fal's queue just waits)."""
        queued = sum(1 for jid in self._queue if self._jobs[jid].owner == job.owner) if cap_pending else None
        decision = self._decision(job.owner, limits, now, in_flight_extra=queued)
        if decision.allowed:
            self._jobs[job.id] = job.model_copy(update={"status": JobStatus.QUEUED, "created_at": now})
            self._queue[job.id] = None
            decision.queue_position = len(self._queue) - 1
        return decision

    def get(self, job_id: str, owner: str, now: float, brief: bool = False) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            return None  # another key's job is indistinguishable from no job
        if job.expires_at is not None and job.expires_at <= now:
            del self._jobs[job_id]
            return None
        update: dict = {"input": {}, "result": None} if brief else {}
        if job.status == JobStatus.QUEUED:
            update["queue_position"] = list(self._queue).index(job_id)
        return job.model_copy(update=update)

    def claim(self, runner: str, lease_s: float, now: float) -> Job | None:
        """The first queued job whose owner is below its concurrency cap, now running on `runner`.
        Queued jobs past their start deadline are failed first, never claimed."""
        self._expire_unstarted(now)
        for job_id in self._queue:
            job = self._jobs[job_id]
            _, slots = self._prune(job.owner, now)
            if len(slots) >= job.max_concurrent:
                continue
            del self._queue[job_id]
            slots[job_id] = now + lease_s
            job.status, job.runner, job.lease_until = JobStatus.RUNNING, runner, now + lease_s
            job.attempts += 1
            if job.started_at is None:
                job.started_at = now
            return job.model_copy()
        return None

    def _expire_unstarted(self, now: float) -> int:
        """Fail the queued jobs not started by their deadline. A re-queued job has started (its worker
        was lost): the deadline bounds the wait for a first start only."""
        overdue = [job for job in map(self._jobs.get, self._queue)
                   if job.start_timeout_s is not None and job.started_at is None
                   and job.created_at + job.start_timeout_s <= now]
        for job in overdue:
            del self._queue[job.id]
            self._terminate(job, JobStatus.FAILED, now, error=START_TIMEOUT)
        return len(overdue)

    def _running(self, job_id: str, runner: str) -> Job | None:
        job = self._jobs.get(job_id)
        return job if job is not None and job.status == JobStatus.RUNNING and job.runner == runner else None

    def heartbeat(self, job_id: str, runner: str, lease_s: float, now: float) -> bool:
        """Extend the lease; False when the runner must stop (lease lost, or cancellation requested)."""
        job = self._running(job_id, runner)
        if job is None or job.lease_until <= now:
            return False  # a lapsed lease is lost even before reap notices: its slot may be taken
        job.lease_until = now + lease_s
        self._slots.setdefault(job.owner, {})[job_id] = job.lease_until
        return not job.cancel_requested

    def log(self, job_id: str, runner: str, message: str, now: float) -> None:
        job = self._running(job_id, runner)
        if job is not None:
            job.logs.append(LogLine(timestamp=now, message=message))

    def finish(self, job_id: str, runner: str, result: JobResult | None, error: JobError | None, now: float) -> bool:
        job = self._running(job_id, runner)
        if job is None or job.lease_until <= now:
            return False  # the lease was lost (even if reap has not noticed): the job goes back to the queue
        self._terminate(job, final_status(result, error), now, result=result, error=error)
        return True

    def cancel(self, job_id: str, owner: str, now: float) -> CancelOutcome:
        job = self.get(job_id, owner, now)
        if job is None:
            return CancelOutcome.NOT_FOUND
        job = self._jobs[job_id]
        if job.status.terminal:
            return CancelOutcome.ALREADY_DONE
        if job.status == JobStatus.QUEUED:
            del self._queue[job_id]
            self._terminate(job, JobStatus.CANCELLED, now, error=CANCELLED)
            return CancelOutcome.CANCELLED
        job.cancel_requested = True
        return CancelOutcome.REQUESTED

    def reap(self, now: float) -> int:
        """Recover jobs whose runner stopped renewing (re-queued at the front once, then failed), fail
        queued jobs past their start deadline and forget expired results. Returns how many jobs changed."""
        changed = 0
        # Newest first: each re-queue goes to the front, so the lost jobs end up in accept order.
        for job in reversed(list(self._jobs.values())):
            if job.status == JobStatus.RUNNING and job.lease_until is not None and job.lease_until <= now:
                changed += 1
                self._slots.get(job.owner, {}).pop(job.id, None)
                if job.cancel_requested:
                    self._terminate(job, JobStatus.CANCELLED, now, error=CANCELLED)
                elif job.attempts < self._max_attempts:
                    job.status, job.runner, job.lease_until = JobStatus.QUEUED, None, None
                    job.logs.append(LogLine(timestamp=now, message="Worker lost; re-queued."))
                    self._queue[job.id] = None
                    self._queue.move_to_end(job.id, last=False)
                else:
                    self._terminate(job, JobStatus.FAILED, now, error=JobError(kind="worker_lost", message=WORKER_LOST))
            elif job.expires_at is not None and job.expires_at <= now:
                changed += 1
                del self._jobs[job.id]
        # After the loop, as in Redis: a job failed here is forgotten by a later pass, not this one.
        return changed + self._expire_unstarted(now)

    def _terminate(self, job: Job, status: JobStatus, now: float, *, result=None, error=None) -> None:
        self._slots.get(job.owner, {}).pop(job.id, None)
        job.status, job.result, job.error = status, result, error
        job.runner, job.lease_until = None, None
        job.finished_at, job.expires_at = now, now + self._ttl
        if job.notify:  # every way a job ends comes through here: none goes unannounced
            self._finished.append(job.id)

    def take_finished(self, limit: int, now: float) -> list[Job]:
        """Up to `limit` ended notify jobs, oldest end first, each handed out once (to whichever
        runner asks first); a job already forgotten is skipped."""
        taken = [self._finished.popleft() for _ in range(min(limit, len(self._finished)))]
        return [self._jobs[job_id].model_copy() for job_id in taken if job_id in self._jobs]

    def renotify(self, job_id: str, now: float) -> None:
        """Offer an ended job's end again (its webhook delivery was cut short by a stopping replica)."""
        job = self._jobs.get(job_id)
        if job is not None and job.status.terminal:
            self._finished.append(job_id)

    def counts(self, now: float) -> dict[str, int]:
        """Jobs queued and running, all owners (for the metrics)."""
        running = sum(1 for job in self._jobs.values() if job.status == JobStatus.RUNNING)
        return {"queued": len(self._queue), "running": running}


class Backend(Protocol):
    """`MemoryStore`'s operations, run somewhere shared; every method is async and atomic."""

    async def call(self, op: str, *args: Any) -> Any: ...


class LocalBackend:
    """In-process: for a single process (unit tests, tools); not shared between replicas."""

    def __init__(self, store: MemoryStore):
        self._store = store

    async def call(self, op: str, *args: Any) -> Any:
        return getattr(self._store, op)(*args)


class StoreActor:
    """A MemoryStore inside a Ray actor: one actor serialises every operation of every replica."""

    def __init__(self, result_ttl_s: float, max_attempts: int):
        self._store = MemoryStore(result_ttl_s, max_attempts)

    def call(self, op: str, *args: Any) -> Any:
        return getattr(self._store, op)(*args)


class RayActorBackend:
    def __init__(self, name: str, result_ttl_s: float, max_attempts: int):
        import ray

        # Detached and found by name: it outlives the ingress replica that created it (a replica
        # crash must not lose the queue) and every replica in the cluster gets the same one.
        self._actor = (
            ray.remote(StoreActor)
            .options(name=name, namespace="llava-serve", lifetime="detached", get_if_exists=True, num_cpus=0)
            .remote(result_ttl_s, max_attempts)
        )

    async def call(self, op: str, *args: Any) -> Any:
        from ray.exceptions import RayActorError

        try:
            return await self._actor.call.remote(op, *args)
        except RayActorError as exc:
            raise StoreUnavailable(f"job store actor unavailable: {type(exc).__name__}") from exc


class JobStore:
    def __init__(self, backend: Backend, clock: Callable[[], float] = time.time):
        self._backend = backend
        self._clock = clock

    async def admit(self, owner: str, limits: Limits, lease_s: float) -> Admission:
        return await self._backend.call("admit", owner, limits, uuid.uuid4().hex, lease_s, self._clock())

    async def renew(self, owner: str, slot: str, lease_s: float) -> bool:
        return await self._backend.call("renew", owner, slot, lease_s, self._clock())

    async def release(self, owner: str, slot: str) -> None:
        await self._backend.call("release", owner, slot, self._clock())

    async def enqueue(self, job: Job, limits: Limits, *, cap_pending: bool) -> Admission:
        return await self._backend.call("enqueue", job, limits, cap_pending, self._clock())

    async def get(self, job_id: str, owner: str, *, brief: bool = False) -> Job | None:
        """The job, or None for an unknown id or another key's job. brief: without the two fields that
        grow with the request and the answer (`input` comes back {}, `result` None), for status polls."""
        return await self._backend.call("get", job_id, owner, self._clock(), brief)

    async def claim(self, runner: str, lease_s: float) -> Job | None:
        return await self._backend.call("claim", runner, lease_s, self._clock())

    async def heartbeat(self, job_id: str, runner: str, lease_s: float) -> bool:
        return await self._backend.call("heartbeat", job_id, runner, lease_s, self._clock())

    async def log(self, job_id: str, runner: str, message: str) -> None:
        await self._backend.call("log", job_id, runner, message, self._clock())

    async def finish(
        self, job_id: str, runner: str, *, result: JobResult | None = None, error: JobError | None = None
    ) -> bool:
        return await self._backend.call("finish", job_id, runner, result, error, self._clock())

    async def cancel(self, job_id: str, owner: str) -> CancelOutcome:
        return await self._backend.call("cancel", job_id, owner, self._clock())

    async def reap(self) -> int:
        return await self._backend.call("reap", self._clock())

    async def take_finished(self, limit: int = 100) -> list[Job]:
        return await self._backend.call("take_finished", limit, self._clock())

    async def renotify(self, job_id: str) -> None:
        await self._backend.call("renotify", job_id, self._clock())

    async def counts(self) -> dict[str, int]:
        return await self._backend.call("counts", self._clock())


def build_store(cfg: ServeConfig) -> JobStore:
    """The configured backend; every ingress replica of one deployment reaches the same state."""
    if cfg.store.backend == "redis":
        from serve.jobs.redis_store import RedisBackend

        backend: Backend = RedisBackend(cfg.store.redis_url, cfg.store.result_ttl_s, cfg.jobs.max_attempts,
                                        prefix=f"llava-serve:{cfg.app_name}")
    else:
        backend = RayActorBackend(f"{cfg.app_name}-jobstore", cfg.store.result_ttl_s, cfg.jobs.max_attempts)
    return JobStore(backend)
