"""Job runners: in every ingress replica, claim queued jobs, run them on the engine, record the outcome.

A runner holds each job by a lease it renews with heartbeats; a heartbeat that comes back False
(cancellation requested, or the lease was lost) cancels the work, which aborts the engine request.
Every few seconds a runner also reaps: jobs whose runner died are re-queued once, then failed. Then
it drains the store's outbox of ended jobs with `notify` set and hands each to its API's executor
(webhooks): the store queues every end there, those no runner saw included (a cancel while queued,
a lost worker, a start deadline), and each is handed to one runner only. A runner that records a
job's outcome drains the outbox at once too, so a webhook does not wait for the next reap.

A replica that stops drains its runner (`stop`): it claims nothing more at once, lets the jobs it runs
finish within a bound (their heartbeats go on, so their leases hold), and abandons what is still running
then to its lease; queued jobs stay in the store for the next replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable, Protocol

from serve.config import JobsConfig
from serve.jobs.failures import classify
from serve.jobs.models import CANCELLED, Job, JobResult
from serve.jobs.store import JobStore
from serve.telemetry.metrics import metrics

log = logging.getLogger(__name__)

LogFn = Callable[[str], Awaitable[None]]


class Executor(Protocol):
    """How one wire API runs its jobs."""

    async def run(self, job: Job, log: LogFn) -> JobResult: ...

    def finished(self, job: Job) -> None:
        """Called once per ended job with notify set, by whichever runner drains the store's outbox
        (webhooks), with the terminal record; must not block."""


# Ray Serve's default graceful_shutdown_wait_loop_s (our deployments keep it): a stopping replica looks at
# its in-flight HTTP requests this often, and runs the ASGI lifespan's shutdown only once none is left.
SERVE_DRAIN_LOOP_S = 2.0
# Kept free at the end of the grace period: recording the last outcomes, closing clients, Serve's own teardown.
DRAIN_MARGIN_S = 2.0
# How long an abandoned job's cancelled work is waited for (its engine request is aborted meanwhile).
ABANDON_WAIT_S = 1.0


def drain_budget_s(graceful_shutdown_timeout_s: float) -> float:
    """How long a stopping ingress replica's runner lets its running jobs finish.

    Serve force-kills a stopping replica `graceful_shutdown_timeout_s` after it asked it to stop; the
    lifespan's shutdown (which stops the runner) starts after the HTTP drain, at least one drain loop
    later, and must end before the kill. An HTTP drain longer than one loop eats into this budget: the
    replica may then be killed mid-drain, and its jobs are recovered from their leases as after a crash.
    """
    return max(0.0, graceful_shutdown_timeout_s - SERVE_DRAIN_LOOP_S - DRAIN_MARGIN_S)


class JobRunner:
    def __init__(self, store: JobStore, runner_id: str, executors: dict[str, Executor], cfg: JobsConfig):
        self._store = store
        self._id = runner_id
        self._executors = executors
        self._cfg = cfg
        self._active: dict[str, asyncio.Task] = {}
        self._working: set[str] = set()  # jobs whose engine work runs (the capacity); recording comes after
        self._freed = asyncio.Event()  # a job's work ended: capacity to claim again, whatever the store says
        self._loop_task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self, drain_s: float) -> None:
        """Drain: claim nothing more, at once; let the running jobs finish for up to `drain_s` seconds
        (heartbeats go on meanwhile, so their leases hold); then cancel what still runs. A cancelled job
        is abandoned to its lease, not recorded: another replica re-runs it once the lease expires.
        Queued jobs are never touched: they stay in the store for the next replica."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, drain_s)
        self._stopping.set()
        if self._loop_task is not None:
            # The loop ends by itself before its next claim. A store call in flight is let finish (within
            # the bound): a job the store is handing over right now is run and drained, not left to its lease.
            await asyncio.wait([self._loop_task], timeout=max(0.0, deadline - loop.time()))
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        running = dict(self._active)
        if running:
            log.info("job runner %s: stopping; letting %d running job(s) finish for up to %.1f s",
                     self._id, len(running), max(0.0, deadline - loop.time()))
            await asyncio.wait(running.values(), timeout=max(0.0, deadline - loop.time()))
        abandoned = dict(self._active)
        for task in abandoned.values():
            task.cancel()
        await asyncio.gather(*abandoned.values(), return_exceptions=True)
        drained = [job_id for job_id in running if job_id not in abandoned]
        if drained:
            log.info("job runner %s: drained %d job(s) that finished while stopping: %s",
                     self._id, len(drained), ", ".join(drained))
        if abandoned:
            log.warning("job runner %s: abandoned %d job(s) still running after %.1f s to their leases "
                        "(another replica re-runs them once those expire): %s",
                        self._id, len(abandoned), drain_s, ", ".join(abandoned))

    async def _loop(self) -> None:
        next_reap, seen = 0.0, -1
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                if loop.time() >= next_reap:
                    await self._store.reap()
                    next_reap = loop.time() + self._cfg.reap_interval_s
                    await self._announce()
                    metrics().job_counts(**await self._store.counts())
                self._freed.clear()
                if len(self._working) < self._cfg.runner_max_parallel and not self._stopping.is_set():
                    job = await self._store.claim(self._id, self._cfg.lease_s)
                    if job is not None:
                        self._working.add(job.id)
                        self._active[job.id] = loop.create_task(self._run(job))
                        continue  # there may be more work: claim again at once (unless stopping)
                # Idle, or full: sleep until the store says work may be claimable (a job queued, a slot
                # freed), one of our jobs ends its work, the next reap, or the stop; no polling meanwhile.
                seen = await self._idle(seen, max(0.0, next_reap - loop.time()))
            except Exception:
                log.exception("job runner: store unavailable; retrying")
                with contextlib.suppress(asyncio.TimeoutError):  # or end at once when stopping
                    await asyncio.wait_for(self._stopping.wait(), self._cfg.runner_retry_s)

    async def _idle(self, seen: int, timeout_s: float) -> int:
        waiting = asyncio.ensure_future(self._store.wait_for_work(seen, timeout_s))
        others = [asyncio.ensure_future(self._stopping.wait()), asyncio.ensure_future(self._freed.wait())]
        try:
            done, _ = await asyncio.wait({waiting, *others}, return_when=asyncio.FIRST_COMPLETED)
            return waiting.result() if waiting in done else seen  # a store error raises, for the loop to retry
        finally:  # however this ends (the loop cancelled when a drain is over too): no task left behind
            for task in (waiting, *others):
                task.cancel()
            await asyncio.gather(waiting, *others, return_exceptions=True)

    async def _announce(self) -> None:
        """Hand the ended notify jobs to their executors; a taken job is never offered again."""
        try:
            while jobs := await self._store.take_finished():
                for job in jobs:
                    try:
                        self._executors[job.api].finished(job)
                    except Exception:  # one API's failure must not cost the others their webhooks
                        log.exception("job runner: announcing the end of %s failed", job.id)
        except Exception:
            log.exception("job runner: store unavailable; announcing at the next reap")

    async def _run(self, job: Job) -> None:
        executor = self._executors[job.api]
        if job.attempts == 1 and job.started_at is not None:
            metrics().queue_wait(job.api, job.started_at - job.created_at)
        work = asyncio.create_task(executor.run(job, lambda msg: self._store.log(job.id, self._id, msg)))
        try:
            while not work.done():
                await asyncio.wait([work], timeout=self._cfg.lease_s / 3)
                if not work.done() and not await self._store.heartbeat(job.id, self._id, self._cfg.lease_s):
                    work.cancel()  # cancelled by its owner, or our lease is gone: stop the engine work
            self._free(job.id)  # its capacity, now: not once the outcome is recorded
            try:
                result, error = work.result(), None
            except asyncio.CancelledError:
                result, error = None, CANCELLED
            except Exception as exc:
                result, error = None, classify(exc)  # each API renders it from its table when read
            # Refused when the lease was lost: the job is re-queued, and whoever ends it queues it.
            if await self._store.finish(job.id, self._id, result=result, error=error):
                await self._announce()  # now, not at the next reap: webhooks go as soon as jobs end
        except asyncio.CancelledError:
            # The replica is stopping and the drain is over: the lease expires and another runner takes over.
            work.cancel()  # aborts the engine request; waited for briefly, so it is sent before the replica goes
            await asyncio.wait([work], timeout=ABANDON_WAIT_S)
            raise
        except Exception:
            log.exception("job runner: could not record the outcome of %s; its lease will expire", job.id)
        finally:
            self._active.pop(job.id, None)
            self._free(job.id)

    def _free(self, job_id: str) -> None:
        if job_id in self._working:
            self._working.discard(job_id)
            self._freed.set()  # a full runner claims again at once
