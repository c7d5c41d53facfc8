"""Job runners: in every ingress replica, claim queued jobs, run them on the engine, record the outcome.

A runner holds each job by a lease it renews with heartbeats; a heartbeat that comes back False
(cancellation requested, or the lease was lost) cancels the work, which aborts the engine request.
Every few seconds a runner also reaps: jobs whose runner died are re-queued once, then failed. Then
it drains the store's outbox of ended jobs with `notify` set and hands each to its API's executor
(webhooks): the store queues every end there, those no runner saw included (a cancel while queued,
a lost worker, a start deadline), and each is handed to one runner only. A runner that records a
job's outcome drains the outbox at once too, so a webhook does not wait for the next reap.

Faults (docs/faults.md): a store call that fails is retried; a running job's work goes on through a store
outage (its lease stands still meanwhile: `JobStore` tells the store how long it was away), and its outcome is
recorded once the store answers, never thrown away; a job whose engine died under it is re-queued (`requeue`).

A replica that stops drains its runner (`stop`): it claims nothing more at once, lets the jobs it runs
finish within a bound (their heartbeats go on, so their leases hold), and abandons what is still running
then to its lease; queued jobs stay in the store for the next replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from typing import Awaitable, Callable, Protocol

from serve.config import JobsConfig
from serve.engine.types import EngineUnavailable
from serve.jobs.failures import classify
from serve.jobs.models import CANCELLED, FailureKind, Job, JobError, JobResult, StoreUnavailable
from serve.jobs.store import JobStore
from serve.telemetry.metrics import metrics

log = logging.getLogger(__name__)

LogFn = Callable[[str], Awaitable[None]]


class Executor(Protocol):
    """How one wire API runs its jobs."""

    async def run(self, job: Job, log: LogFn) -> JobResult: ...

    def finished(self, job: Job) -> bool:
        """Called once per ended job with notify set, by whichever runner drains the store's outbox
        (webhooks), with the terminal record; must not block. True when a delivery started: it tells the store
        when it is over (`notified`); until then the store offers it again if it outlives its lease."""


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


ENGINE_LOST = "The model's engine stopped while running this request, each time it was tried; please retry."


class Outage:
    """The store's availability as this runner sees it: one log line when it becomes unavailable and one when
    it is back, not one per failed call (a runner retries every runner_retry_s)."""

    def __init__(self, runner_id: str):
        self._runner_id, self._since = runner_id, None

    def began(self, exc: BaseException) -> None:
        if self._since is None:
            self._since = time.monotonic()
            log.warning("job runner %s: job store unavailable (%s); retrying", self._runner_id, exc)

    def ended(self) -> None:
        if self._since is not None:
            log.warning("job runner %s: job store available again after %.1f s", self._runner_id,
                        time.monotonic() - self._since)
            self._since = None


class JobRunner:
    def __init__(self, store: JobStore, runner_id: str, executors: dict[str, Executor], cfg: JobsConfig,
                 engine_awake: Callable[[], Awaitable[bool]] | None = None):
        self._store = store
        self._engine_awake = engine_awake  # False while the engine rests at 0 replicas: claim nothing then
        self._id = runner_id
        self._executors = executors
        self._cfg = cfg
        self._active: dict[str, asyncio.Task] = {}
        self._working: set[str] = set()  # jobs whose engine work runs (the capacity); recording comes after
        self._freed = asyncio.Event()  # a job's work ended: capacity to claim again, whatever the store says
        self._loop_task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._outage = Outage(runner_id)
        self._claims = itertools.count(1)

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
                if self._engine_awake is not None and not await self._engine_awake():
                    # The engine rests at 0 replicas: queued jobs stay queued (and say so to their owners) until
                    # the autoscaling policy, which counts them, has started one (docs/autoscaling.md).
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self._cfg.runner_retry_s)
                    continue
                if len(self._working) < self._cfg.runner_max_parallel and not self._stopping.is_set():
                    # One name per claim ("<replica>#<n>"): a call retried through an outage about one run of a
                    # job can never act on a later run of the same job by this runner (docs/faults.md).
                    run = f"{self._id}#{next(self._claims)}"
                    job = await self._store.claim(run, self._cfg.lease_s)
                    if job is not None:
                        self._working.add(job.id)
                        self._active[job.id] = loop.create_task(self._run(job, run))
                        continue  # there may be more work: claim again at once (unless stopping)
                # Idle, or full: sleep until the store says work may be claimable (a job queued, a slot
                # freed), one of our jobs ends its work, the next reap, or the stop; no polling meanwhile.
                seen = await self._idle(seen, max(0.0, next_reap - loop.time()))
            except Exception as exc:
                if isinstance(exc, StoreUnavailable):
                    self._outage.began(exc)
                else:
                    log.exception("job runner: unexpected failure; retrying")
                with contextlib.suppress(asyncio.TimeoutError):  # or end at once when stopping
                    await asyncio.wait_for(self._stopping.wait(), self._cfg.runner_retry_s)
            else:
                self._outage.ended()

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
        """Hand the ended notify jobs to their executors. A delivery that started is leased until it is over
        (at least once: a replica that dies mid-delivery leaves it to be sent again; docs/faults.md)."""
        try:
            while jobs := await self._store.take_finished(self._cfg.notify_lease_s):
                for job in jobs:
                    try:
                        started = self._executors[job.api].finished(job)
                    except Exception:  # one API's failure must not cost the others their webhooks
                        log.exception("job runner: announcing the end of %s failed", job.id)
                        started = False
                    if not started:  # nothing to deliver (or it cannot be): not to be offered again
                        await self._store.notified(job.id)
        except StoreUnavailable as exc:
            self._outage.began(exc)  # announced at the next reap
        except Exception:
            log.exception("job runner: announcing failed; announcing at the next reap")

    async def _run(self, job: Job, run: str) -> None:
        """Run a job claimed as `run` (this runner's name for the claim), and record how it ended."""
        executor = self._executors[job.api]
        if job.attempts == 1 and job.started_at is not None:
            metrics().queue_wait(job.api, job.started_at - job.created_at)
        work = asyncio.create_task(executor.run(job, lambda msg: self._log(job.id, run, msg)))
        try:
            while not work.done():
                await asyncio.wait([work], timeout=self._cfg.lease_s / 3)
                if work.done():
                    break
                try:
                    if await self._store.heartbeat(job.id, run, self._cfg.lease_s):
                        self._outage.ended()
                    else:
                        work.cancel()  # cancelled by its owner, or our lease is gone: stop the engine work
                except StoreUnavailable as exc:
                    # The work goes on: its lease stands still while the store is away, and the first heartbeat
                    # that gets through says whether the job is still ours (docs/faults.md).
                    self._outage.began(exc)
            self._free(job.id)  # its capacity, now: not once the outcome is recorded
            try:
                outcome = functools.partial(self._store.finish, job.id, run, result=work.result())
            except asyncio.CancelledError:
                outcome = functools.partial(self._store.finish, job.id, run, error=CANCELLED)
            except EngineUnavailable as exc:
                # The engine died under the job (docs/faults.md): back to the queue for the replacement, once;
                # a job that loses its engine every time it runs fails with this error.
                log.warning("job runner: the engine failed under %s (%s); handing it back to the queue", job.id, exc)
                lost = JobError(kind=FailureKind.UNAVAILABLE, message=ENGINE_LOST)
                outcome = functools.partial(self._store.requeue, job.id, run, lost)
            except Exception as exc:
                # Each API renders the failure from its table when read.
                outcome = functools.partial(self._store.finish, job.id, run, error=classify(exc))
            # Refused when the lease was lost: the job is re-queued, and whoever ends it queues it. Retried
            # through a store outage: a finished generation is recorded, never thrown away and run again.
            if await self._record(outcome):
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

    async def _log(self, job_id: str, run: str, message: str) -> None:
        # A job's log line is not worth failing or holding up the job for: a store that does not take it soon
        # (down, or frozen: calls then hang rather than fail) loses it, and the work goes on to its outcome.
        try:
            async with asyncio.timeout(self._cfg.lease_s / 3):
                await self._store.log(job_id, run, message)
        except (StoreUnavailable, TimeoutError) as exc:
            self._outage.began(exc)

    async def _record(self, call: Callable[[], Awaitable[bool]]) -> bool:
        """A job's outcome into the store, retried while the store is unavailable (its answer says whether
        the job was still ours). Only the replica's stop ends the retries: the job is then left to its lease."""
        while True:
            try:
                done = await call()
            except StoreUnavailable as exc:
                self._outage.began(exc)
                await asyncio.sleep(self._cfg.runner_retry_s)
                continue
            self._outage.ended()
            return done

    def _free(self, job_id: str) -> None:
        if job_id in self._working:
            self._working.discard(job_id)
            self._freed.set()  # a full runner claims again at once
