"""`MemoryStore`: the reference semantics of `StoreBackend`, in one process.

Every operation but `wait_for_work` (which changes nothing) runs to its end without awaiting anything,
so each is one atomic step on its event loop; the Redis backend's Lua scripts follow this logic step by
step (their tests run both in lockstep). In-process it serves unit tests and tools; inside a Ray actor
(`serve.jobs.ray_actor`) it is the embedded default shared by every replica.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
from collections import OrderedDict, deque
from typing import Any

from serve.jobs.models import (
    CANCELLED,
    QUEUE_FULL_RETRY_S,
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
    abridge_long_strings,
    final_status,
    input_bytes,
)


class MemoryStore:
    """Implements `serve.jobs.store.StoreBackend` (whose docstrings say what each operation does)."""

    def __init__(self, result_ttl_s: float, max_attempts: int):
        self._ttl = result_ttl_s
        self._max_attempts = max_attempts
        self._jobs: dict[str, Job] = {}  # every job, its input abridged (what reads return)
        self._inputs: dict[str, dict[str, Any]] = {}  # unfinished jobs' full inputs: claim hands them to runners
        self._input_bytes: dict[str, int] = {}  # unfinished job id -> its full input's bytes
        self._stored: dict[str, int] = {}  # owner -> the sum of those of its jobs (max_stored_bytes)
        # The queue, one FIFO for everyone kept as each owner's own FIFO plus the owners' order, so a claim
        # looks at owners, never at jobs (docs/architecture.md, "The job store"). Scores, as in Redis:
        # accept order, and a re-queue goes below every other.
        self._scores: dict[str, float] = {}  # queued job id -> its place in the FIFO
        self._order: list[float] = []  # those scores, sorted: a job's queue position is its index here
        self._owner_queues: dict[str, OrderedDict[str, None]] = {}  # owner -> its queued ids, FIFO; never empty
        self._accepted = 0  # the last accept's score
        self._deadlines: dict[str, float] = {}  # queued, never-started job id -> its start deadline
        self._deadline_heap: list[tuple[float, float, str]] = []  # (deadline, score, id); dequeued ids skipped
        self._windows: dict[str, deque[float]] = {}  # owner -> admission times in the window
        self._slots: dict[str, dict[str, float]] = {}  # owner -> slot id -> lease expiry
        self._finished: deque[str] = deque()  # the outbox: ended notify jobs not yet handed out, FIFO
        self._notifying: dict[str, float] = {}  # handed out, delivery not over: job id -> the lease's end
        self._resumed_until: float | None = None  # the end of the latest outage a `resume` reported
        self._work = 0  # moves when queued work may have become claimable (wait_for_work)
        self._woken: asyncio.Event | None = None  # set (and dropped) when it moves; made by a waiter

    def _announce(self) -> None:
        """Queued work may be claimable now: wake the runners waiting for it."""
        if not self._scores:
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

    def _decision(self, owner: str, limits: Limits, now: float, in_flight_extra: int | None,
                  queued: tuple[int, int] | None = None) -> Admission:
        """Admit (recording the time in the window) or refuse (recording nothing). `in_flight_extra`:
        work counted against the concurrency cap beyond the slots; None = no concurrency check. `queued`
        (an enqueue): the owner's queued jobs, and its stored bytes with the new job's, against its bounds."""
        window, slots = self._prune(owner, now)
        reset_s = window[0] + WINDOW_S - now if window else 0.0
        base = {"limit": limits.rate_per_minute, "max_concurrent": limits.max_concurrent,
                "remaining": max(0, limits.rate_per_minute - len(window)), "reset_s": reset_s}
        if len(window) >= limits.rate_per_minute:
            return Admission(allowed=False, reason="rate", retry_after_s=reset_s, **base)
        if in_flight_extra is not None and len(slots) + in_flight_extra >= limits.max_concurrent:
            return Admission(allowed=False, reason="concurrency", retry_after_s=1.0, **base)
        if queued is not None and queued[0] >= limits.max_pending:
            return Admission(allowed=False, reason="pending", retry_after_s=QUEUE_FULL_RETRY_S, **base)
        if queued is not None and queued[1] > limits.max_stored_bytes:
            return Admission(allowed=False, reason="stored", retry_after_s=QUEUE_FULL_RETRY_S, **base)
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
        slots[slot] = max(slots[slot], now + lease_s)  # a lease only grows (a late call may carry an old `now`)
        return True

    async def release(self, owner: str, slot: str, now: float) -> None:
        self._slots.get(owner, {}).pop(slot, None)
        self._announce()

    # -- jobs -----------------------------------------------------------------------------

    async def enqueue(self, job: Job, limits: Limits, cap_pending: bool, now: float) -> Admission:
        queued = len(self._owner_queues.get(job.owner, ()))
        size = input_bytes(job.input)
        stored = self._stored.get(job.owner, 0) + size
        decision = self._decision(job.owner, limits, now, queued if cap_pending else None, (queued, stored))
        if decision.allowed:
            accepted = job.model_copy(update={"status": JobStatus.QUEUED, "created_at": now,
                                              "input": abridge_long_strings(job.input)})
            self._jobs[job.id], self._inputs[job.id] = accepted, job.input
            self._input_bytes[job.id] = size
            self._stored[job.owner] = stored
            self._accepted += 1
            self._push(accepted, float(self._accepted))
            if job.start_timeout_s is not None:
                self._deadlines[job.id] = deadline = now + job.start_timeout_s
                heapq.heappush(self._deadline_heap, (deadline, self._scores[job.id], job.id))
            decision.queue_position = len(self._order) - 1
            self._announce()
        return decision

    # -- the queue --------------------------------------------------------------------------

    def _push(self, job: Job, score: float) -> None:
        """Queue a job at `score`: above every other (an accept) or below every other (a re-queue)."""
        self._scores[job.id] = score
        bisect.insort(self._order, score)
        owner_queue = self._owner_queues.setdefault(job.owner, OrderedDict())
        owner_queue[job.id] = None
        if score < self._scores[next(iter(owner_queue))]:
            owner_queue.move_to_end(job.id, last=False)

    def _dequeue(self, job: Job) -> None:
        """Out of the queue (claimed, cancelled or failed); also drops its start deadline."""
        score = self._scores.pop(job.id)
        del self._order[bisect.bisect_left(self._order, score)]
        owner_queue = self._owner_queues[job.owner]
        del owner_queue[job.id]
        if not owner_queue:
            del self._owner_queues[job.owner]
        self._deadlines.pop(job.id, None)

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
        update: dict = {"result": None} if brief else {}
        if job.status == JobStatus.QUEUED:
            update["queue_position"] = bisect.bisect_left(self._order, self._scores[job_id])
        return job.model_copy(update=update)

    async def claim(self, runner: str, lease_s: float, now: float) -> Job | None:
        self._expire_unstarted(now)
        # Each owner's first job, in queue order: the first whose owner is below its cap is the first
        # claimable job of the whole queue.
        for _, owner in sorted((self._scores[next(iter(q))], owner) for owner, q in self._owner_queues.items()):
            job = self._jobs[next(iter(self._owner_queues[owner]))]
            _, slots = self._prune(owner, now)
            if len(slots) >= job.max_concurrent:
                continue
            self._dequeue(job)
            slots[job.id] = now + lease_s
            job.status, job.runner, job.lease_until = JobStatus.RUNNING, runner, now + lease_s
            job.attempts += 1
            if job.started_at is None:
                job.started_at = now
            return job.model_copy(update={"input": self._inputs[job.id]})
        return None

    def _expire_unstarted(self, now: float) -> int:
        """Fail the queued jobs not started by their deadline. A re-queued job has started (its worker
        was lost): the deadline bounds the wait for a first start only."""
        overdue = []
        while self._deadline_heap and self._deadline_heap[0][0] <= now:
            _, _, job_id = heapq.heappop(self._deadline_heap)
            if job_id in self._deadlines:
                overdue.append(self._jobs[job_id])
        if len(self._deadline_heap) > 2 * len(self._deadlines) + 64:  # mostly entries of jobs since started
            self._deadline_heap = [entry for entry in self._deadline_heap if entry[2] in self._deadlines]
            heapq.heapify(self._deadline_heap)
        for job in sorted(overdue, key=lambda job: self._scores[job.id]):  # queue order: the outbox's
            self._dequeue(job)
            self._terminate(job, JobStatus.FAILED, now, error=START_TIMEOUT)
        return len(overdue)

    def _running(self, job_id: str, runner: str) -> Job | None:
        job = self._jobs.get(job_id)
        return job if job is not None and job.status == JobStatus.RUNNING and job.runner == runner else None

    async def heartbeat(self, job_id: str, runner: str, lease_s: float, now: float) -> bool:
        # A lapsed lease reap has not acted on is still this runner's: only a reap takes a job away.
        job = self._running(job_id, runner)
        if job is None:
            return False
        # A lease only grows: a heartbeat that waited on a frozen store carries the `now` it was sent at.
        job.lease_until = max(job.lease_until or now, now + lease_s)
        slots = self._slots.setdefault(job.owner, {})
        slots[job_id] = max(slots.get(job_id, now), job.lease_until)
        return not job.cancel_requested

    async def log(self, job_id: str, runner: str, message: str, now: float) -> None:
        job = self._running(job_id, runner)
        if job is not None:
            job.logs.append(LogLine(timestamp=now, message=message))

    async def finish(
        self, job_id: str, runner: str, result: JobResult | None, error: JobError | None, now: float
    ) -> bool:
        # Still running here, even past its lease: nobody else can have it (a reap re-queues it and clears
        # the runner), and an answer recorded after a store outage is not thrown away.
        job = self._running(job_id, runner)
        if job is None:
            return False
        if job.cancel_requested:  # its owner was told it would be (docs/api.md §2.5.5), though it ended first
            self._terminate(job, JobStatus.CANCELLED, now, error=CANCELLED)
        else:
            self._terminate(job, final_status(result, error), now, result=result, error=error)
        return True

    async def requeue(self, job_id: str, runner: str, error: JobError, now: float) -> bool:
        job = self._running(job_id, runner)
        if job is None:
            return False
        self._lose(job, error, now)
        return True

    async def cancel(self, job_id: str, owner: str, now: float) -> CancelOutcome:
        job = self._visible(job_id, owner, now)
        if job is None:
            return CancelOutcome.NOT_FOUND
        if job.status.terminal:
            return CancelOutcome.ALREADY_DONE
        if job.status == JobStatus.QUEUED:
            self._dequeue(job)
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
                self._lose(job, WORKER_LOST, now)
            elif job.expires_at is not None and job.expires_at <= now:
                changed += 1
                del self._jobs[job.id]
        # Deliveries whose deliverer died: offered again, at the front, oldest lease first.
        for _, job_id in sorted(((until, job_id) for job_id, until in self._notifying.items() if until <= now),
                                reverse=True):
            del self._notifying[job_id]
            self._finished.appendleft(job_id)
        # After the loop, as in Redis: a job failed here is forgotten by a later pass, not this one.
        return changed + self._expire_unstarted(now)

    def _lose(self, job: Job, error: JobError, now: float) -> None:
        """A running job taken from its runner (reap, `requeue`): back to the front of the queue while it
        has attempts left, else ended with `error`; cancelled instead if that was asked for."""
        self._slots.get(job.owner, {}).pop(job.id, None)
        if job.cancel_requested:
            self._terminate(job, JobStatus.CANCELLED, now, error=CANCELLED)
        elif job.attempts < self._max_attempts:
            job.status, job.runner, job.lease_until = JobStatus.QUEUED, None, None
            job.logs.append(LogLine(timestamp=now, message=REQUEUED))
            self._push(job, self._order[0] - 1 if self._order else 0.0)  # at the front
            self._announce()
        else:
            self._terminate(job, JobStatus.FAILED, now, error=error)

    def _terminate(self, job: Job, status: JobStatus, now: float, *, result=None, error=None) -> None:
        self._slots.get(job.owner, {}).pop(job.id, None)
        self._inputs.pop(job.id, None)  # the record keeps the abridged input only
        self._stored[job.owner] -= self._input_bytes.pop(job.id)
        if not self._stored[job.owner]:
            del self._stored[job.owner]
        job.status, job.result, job.error = status, result, error
        job.runner, job.lease_until = None, None
        job.finished_at, job.expires_at = now, now + self._ttl
        if job.notify:  # every way a job ends comes through here: none goes unannounced
            self._finished.append(job.id)
        self._announce()  # its slot is free

    async def take_finished(self, limit: int, lease_s: float, now: float) -> list[Job]:
        taken = [self._finished.popleft() for _ in range(min(limit, len(self._finished)))]
        taken = [job_id for job_id in taken if job_id in self._jobs]
        for job_id in taken:
            self._notifying[job_id] = now + lease_s
        return [self._jobs[job_id].model_copy() for job_id in taken]

    async def notified(self, job_id: str, now: float) -> None:
        self._notifying.pop(job_id, None)

    async def renotify(self, job_id: str, now: float) -> None:
        self._notifying.pop(job_id, None)
        job = self._jobs.get(job_id)
        if job is not None and job.status.terminal:
            self._finished.append(job_id)

    async def resume(self, since: float, now: float) -> None:
        away = now - max(since, self._resumed_until or since)
        if away <= 0:
            return
        self._resumed_until = now
        for job in self._jobs.values():
            if job.status == JobStatus.RUNNING and job.lease_until is not None:
                job.lease_until += away
        for slots in self._slots.values():
            for slot in slots:
                slots[slot] += away

    async def counts(self, now: float) -> dict[str, int]:
        running = sum(1 for job in self._jobs.values() if job.status == JobStatus.RUNNING)
        return {"queued": len(self._scores), "running": running}

    async def startable(self, now: float) -> int:
        total = 0
        for owner, queue in self._owner_queues.items():
            if queue:
                _, slots = self._prune(owner, now)
                total += min(len(queue), max(0, self._jobs[next(iter(queue))].max_concurrent - len(slots)))
        return total
