"""Job runners: in every ingress replica, claim queued jobs, run them on the engine, record the outcome.

A runner holds each job by a lease it renews with heartbeats; a heartbeat that comes back False
(cancellation requested, or the lease was lost) cancels the work, which aborts the engine request.
Every few seconds a runner also reaps: jobs whose runner died are re-queued once, then failed. Then
it drains the store's outbox of ended jobs with `notify` set and hands each to its API's executor
(webhooks): the store queues every end there, those no runner saw included (a cancel while queued,
a lost worker, a start deadline), and each is handed to one runner only. A runner that records a
job's outcome drains the outbox at once too, so a webhook does not wait for the next reap.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Protocol

from pydantic import ValidationError

from serve.config import JobsConfig
from serve.engine.types import EngineInputError, EngineUnavailable
from serve.jobs.models import CANCELLED, Job, JobError, JobResult
from serve.jobs.store import JobStore
from serve.media.intake import ImageDownloadError, MediaError

log = logging.getLogger(__name__)

LogFn = Callable[[str], Awaitable[None]]


class Executor(Protocol):
    """How one wire API runs its jobs."""

    async def run(self, job: Job, log: LogFn) -> JobResult: ...

    def detail(self, exc: Exception, job: Job) -> Any:
        """What the API needs to replay this failure to its client (e.g. fal's HTTP status and body)."""

    def finished(self, job: Job) -> None:
        """Called once per ended job with notify set, by whichever runner drains the store's outbox
        (webhooks), with the terminal record; must not block."""


def job_error(exc: Exception, detail: Any) -> JobError:
    if isinstance(exc, ValidationError):
        kind = "validation"
    elif isinstance(exc, ImageDownloadError):
        kind = "image_download"
    elif isinstance(exc, MediaError):
        kind = "image_load"
    elif isinstance(exc, EngineInputError):
        kind = "input"
    elif isinstance(exc, EngineUnavailable):
        kind = "unavailable"
    else:
        log.exception("job failed unexpectedly", exc_info=exc)
        return JobError(kind="internal", message="Internal error while running the request.", detail=detail)
    return JobError(kind=kind, message=str(exc), detail=detail)


class JobRunner:
    def __init__(self, store: JobStore, runner_id: str, executors: dict[str, Executor], cfg: JobsConfig):
        self._store = store
        self._id = runner_id
        self._executors = executors
        self._cfg = cfg
        self._active: dict[str, asyncio.Task] = {}
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop claiming; running jobs are abandoned to their leases (another replica recovers them)."""
        for task in [self._loop_task, *self._active.values()]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._loop_task, *self._active.values()] if t), return_exceptions=True)

    async def _loop(self) -> None:
        next_reap = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() >= next_reap:
                    await self._store.reap()
                    next_reap = loop.time() + self._cfg.reap_interval_s
                    await self._announce()
                job = None
                if len(self._active) < self._cfg.runner_max_parallel:
                    job = await self._store.claim(self._id, self._cfg.lease_s)
                if job is not None:
                    self._active[job.id] = loop.create_task(self._run(job))
                    continue  # there may be more work: claim again at once
            except Exception:
                log.exception("job runner: store unavailable; retrying")
            await asyncio.sleep(self._cfg.runner_poll_interval_s)

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
        work = asyncio.create_task(executor.run(job, lambda msg: self._store.log(job.id, self._id, msg)))
        try:
            while not work.done():
                await asyncio.wait([work], timeout=self._cfg.lease_s / 3)
                if not work.done() and not await self._store.heartbeat(job.id, self._id, self._cfg.lease_s):
                    work.cancel()  # cancelled by its owner, or our lease is gone: stop the engine work
            try:
                result, error = work.result(), None
            except asyncio.CancelledError:
                result, error = None, CANCELLED
            except Exception as exc:
                result, error = None, job_error(exc, executor.detail(exc, job))
            # Refused when the lease was lost: the job is re-queued, and whoever ends it queues it.
            if await self._store.finish(job.id, self._id, result=result, error=error):
                await self._announce()  # now, not at the next reap: webhooks go as soon as jobs end
        except asyncio.CancelledError:
            work.cancel()  # the replica is stopping: the lease expires and another runner takes over
            raise
        except Exception:
            log.exception("job runner: could not record the outcome of %s; its lease will expire", job.id)
        finally:
            self._active.pop(job.id, None)
