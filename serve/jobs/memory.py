"""`MemoryStore`: the reference semantics of `StoreBackend`, in one process.

Every operation but `wait_for_work` (which changes nothing) runs to its end without awaiting anything,
so each is one atomic step on its event loop; the Redis backend's Lua scripts follow this logic step by
step (their tests run both in lockstep). In-process it serves unit tests and tools; inside a Ray actor
(`serve.jobs.ray_actor`) it is the embedded default shared by every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque

from serve.jobs.models import (
    CANCELLED,
    REQUEUED,
    START_TIMEOUT,
    WINDOW_S,
    WORKER_LOST,
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


class MemoryStore:
    """Implements `serve.jobs.store.StoreBackend` (whose docstrings say what each operation does)."""

    def __init__(self, result_ttl_s: float, max_attempts: int):
        self._ttl = result_ttl_s
        self._max_attempts = max_attempts
        self._jobs: dict[str, Job] = {}
        self._queue: OrderedDict[str, None] = OrderedDict()  # queued job ids, FIFO
        self._windows: dict[str, deque[float]] = {}  # owner -> admission times in the window
        self._slots: dict[str, dict[str, float]] = {}  # owner -> slot id -> lease expiry
        self._finished: deque[str] = deque()  # the outbox: ended notify jobs not yet handed out, FIFO
        self._work = 0  # moves when queued work may have become claimable (wait_for_work)
        self._woken: asyncio.Event | None = None  # set (and dropped) when it moves; made by a waiter

    def _announce(self) -> None:
        """Queued work may be claimable now: wake the runners waiting for it."""
        if not self._queue:
            return
        self._work += 1
        if self._woken is not None:
            self._woken.set()
            self._woken = None

    async def wait_for_work(self, seen: int, timeout_s: float, now: float) -> int:
        if self._work == seen:
            if self._woken is None:
                self._woken = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), timeout_s)
        return self._work

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

    async def admit(self, owner: str, limits: Limits, slot: str, lease_s: float, now: float) -> Admission:
        decision = self._decision(owner, limits, now, in_flight_extra=0)
        if decision.allowed:
            self._slots[owner][slot] = now + lease_s
            decision.slot = slot
        return decision

    async def renew(self, owner: str, slot: str, lease_s: float, now: float) -> bool:
        slots = self._slots.get(owner, {})
        if slots.get(slot, now) <= now:  # gone, or lapsed: its place may be someone else's now
            slots.pop(slot, None)
            return False
        slots[slot] = now + lease_s
        return True

    async def release(self, owner: str, slot: str, now: float) -> None:
        self._slots.get(owner, {}).pop(slot, None)
        self._announce()

    # -- jobs -----------------------------------------------------------------------------

    async def enqueue(self, job: Job, limits: Limits, cap_pending: bool, now: float) -> Admission:
        queued = sum(1 for jid in self._queue if self._jobs[jid].owner == job.owner) if cap_pending else None
        decision = self._decision(job.owner, limits, now, in_flight_extra=queued)
        if decision.allowed:
            self._jobs[job.id] = job.model_copy(update={"status": JobStatus.QUEUED, "created_at": now})
            self._queue[job.id] = None
            decision.queue_position = len(self._queue) - 1
            self._announce()
        return decision

    def _visible(self, job_id: str, owner: str, now: float) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            return None  # another key's job is indistinguishable from no job
        if job.expires_at is not None and job.expires_at <= now:
            del self._jobs[job_id]  # forgotten on sight, before reap gets to it
            return None
        return job

    async def get(self, job_id: str, owner: str, now: float, brief: bool) -> Job | None:
        job = self._visible(job_id, owner, now)
        if job is None:
            return None
        update: dict = {"input": {}, "result": None} if brief else {}
        if job.status == JobStatus.QUEUED:
            update["queue_position"] = list(self._queue).index(job_id)
        return job.model_copy(update=update)

    async def claim(self, runner: str, lease_s: float, now: float) -> Job | None:
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

    async def heartbeat(self, job_id: str, runner: str, lease_s: float, now: float) -> bool:
        job = self._running(job_id, runner)
        if job is None or job.lease_until <= now:
            return False  # a lapsed lease is lost even before reap notices: its slot may be taken
        job.lease_until = now + lease_s
        self._slots.setdefault(job.owner, {})[job_id] = job.lease_until
        return not job.cancel_requested

    async def log(self, job_id: str, runner: str, message: str, now: float) -> None:
        job = self._running(job_id, runner)
        if job is not None:
            job.logs.append(LogLine(timestamp=now, message=message))

    async def finish(
        self, job_id: str, runner: str, result: JobResult | None, error: JobError | None, now: float
    ) -> bool:
        job = self._running(job_id, runner)
        if job is None or job.lease_until <= now:
            return False  # the lease was lost (even if reap has not noticed): the job goes back to the queue
        self._terminate(job, final_status(result, error), now, result=result, error=error)
        return True

    async def cancel(self, job_id: str, owner: str, now: float) -> CancelOutcome:
        job = self._visible(job_id, owner, now)
        if job is None:
            return CancelOutcome.NOT_FOUND
        if job.status.terminal:
            return CancelOutcome.ALREADY_DONE
        if job.status == JobStatus.QUEUED:
            del self._queue[job_id]
            self._terminate(job, JobStatus.CANCELLED, now, error=CANCELLED)
            return CancelOutcome.CANCELLED
        job.cancel_requested = True
        return CancelOutcome.REQUESTED

    async def reap(self, now: float) -> int:
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
                    job.logs.append(LogLine(timestamp=now, message=REQUEUED))
                    self._queue[job.id] = None
                    self._queue.move_to_end(job.id, last=False)
                    self._announce()
                else:
                    self._terminate(job, JobStatus.FAILED, now, error=WORKER_LOST)
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
        self._announce()  # its slot is free

    async def take_finished(self, limit: int, now: float) -> list[Job]:
        taken = [self._finished.popleft() for _ in range(min(limit, len(self._finished)))]
        return [self._jobs[job_id].model_copy() for job_id in taken if job_id in self._jobs]

    async def renotify(self, job_id: str, now: float) -> None:
        job = self._jobs.get(job_id)
        if job is not None and job.status.terminal:
            self._finished.append(job_id)

    async def counts(self, now: float) -> dict[str, int]:
        running = sum(1 for job in self._jobs.values() if job.status == JobStatus.RUNNING)
        return {"queued": len(self._queue), "running": running}
