"""JobRunner with the in-process store and fake engines: lifecycle, errors kept for replay, cancel, caps,
announcing ended jobs (webhooks), draining on stop."""

import asyncio
import time
import uuid

from serve.api.fal.protocol import outcome
from serve.api.fal.serving import FalExecutor
from serve.config import JobsConfig
from serve.jobs.models import CancelOutcome, Job, JobStatus, Limits
from serve.jobs.runner import JobRunner, drain_budget_s
from tests.conftest import data_uri
from tests.fakes import FakeEngine, SlowEngine, make_services

FAST = JobsConfig(lease_s=3.0, outage_after_s=1.0, runner_retry_s=0.01, reap_interval_s=0.1)


def fal_job(owner="alice", cap=10, **inp) -> Job:
    return Job(id=str(uuid.uuid4()), owner=owner, api="fal", max_concurrent=cap, created_at=0.0,
               input={"prompt": "Describe", "image_url": data_uri(), "max_new_tokens": 5, **inp})


async def until(store, job, owner, statuses, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await store.get(job.id, owner)
        if got.status in statuses or asyncio.get_running_loop().time() > deadline:
            return got
        await asyncio.sleep(0.02)


def with_runner(engine, body):
    async def main():
        services = make_services(engine)
        runner = JobRunner(services.store, "runner-1", {"fal": FalExecutor(services)}, FAST)
        runner.start()
        try:
            return await body(services.store)
        finally:
            await runner.stop(0)

    return asyncio.run(main())


def test_a_job_runs_to_success_with_real_logs():
    async def body(store):
        job = fal_job()
        await store.enqueue(job, Limits(rate_per_minute=60, max_concurrent=10), cap_pending=False)
        return await until(store, job, "alice", {JobStatus.SUCCEEDED, JobStatus.FAILED})

    done = with_runner(FakeEngine(), body)
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 1
    assert done.result.text == "w0 w1 w2 w3 w4 " and done.result.num_output_tokens == 5
    assert done.result.chunks == ["w0 ", "w1 ", "w2 ", "w3 ", "w4 "]
    messages = [line.message for line in done.logs]
    assert messages[0] == "Image fetched (64x48)" and messages[1] == "Generating"
    assert messages[2] == "Generated 5 tokens from 600 input tokens"


def test_failures_are_recorded_with_their_kind_and_replayed_as_fal_errors():
    async def body(store):
        limits = Limits(rate_per_minute=60, max_concurrent=10)
        bad_image, no_prompt = fal_job(image_url="data:image/png;base64,aGVsbG8="), fal_job()
        no_prompt.input.pop("prompt")
        for j in (bad_image, no_prompt):
            await store.enqueue(j, limits, cap_pending=False)
        return [await until(store, j, "alice", {JobStatus.FAILED, JobStatus.SUCCEEDED}) for j in (bad_image, no_prompt)]

    bad_image, no_prompt = with_runner(FakeEngine(), body)
    assert bad_image.status == JobStatus.FAILED and bad_image.error.kind == "image_load"
    code, body, _ = outcome(bad_image)  # what fal's result endpoint replays
    assert code == 422 and body["detail"][0]["type"] == "image_load_error"
    assert body["detail"][0]["input"] == bad_image.input["image_url"]
    assert no_prompt.error.kind == "validation"
    assert [p.loc for p in no_prompt.error.problems] == [["prompt"]]
    assert outcome(no_prompt)[1]["detail"][0]["loc"] == ["body", "prompt"]


def test_cancelling_a_running_job_stops_the_engine_work():
    engine = SlowEngine(delay=0.05)

    async def body(store):
        job = fal_job(max_new_tokens=200)  # ~10 s if left alone
        await store.enqueue(job, Limits(rate_per_minute=60, max_concurrent=10), cap_pending=False)
        await until(store, job, "alice", {JobStatus.RUNNING})
        await asyncio.sleep(0.2)
        assert await store.cancel(job.id, "alice") == CancelOutcome.REQUESTED
        return await until(store, job, "alice", {JobStatus.CANCELLED, JobStatus.SUCCEEDED}, timeout=5)

    done = with_runner(engine, body)
    assert done.status == JobStatus.CANCELLED and done.error.kind == "cancelled"
    assert engine.cancelled == 1


def test_jobs_respect_the_owners_concurrency_cap():
    engine = SlowEngine(delay=0.01)
    running_peak = []

    async def body(store):
        limits = Limits(rate_per_minute=60, max_concurrent=2)
        jobs = [fal_job(cap=2, max_new_tokens=15) for _ in range(5)]
        for j in jobs:
            await store.enqueue(j, limits, cap_pending=False)
        while True:
            states = [(await store.get(j.id, "alice")).status for j in jobs]
            running_peak.append(states.count(JobStatus.RUNNING))
            if all(s == JobStatus.SUCCEEDED for s in states):
                return states
            await asyncio.sleep(0.005)

    with_runner(engine, body)
    assert max(running_peak) == 2


class Announced(FalExecutor):
    """A fal executor that records the ended jobs it is handed (and fails on them, if told to)."""

    def __init__(self, services, calls: list, fails: bool = False):
        super().__init__(services)
        self._calls, self._fails = calls, fails

    def finished(self, job: Job) -> None:
        self._calls.append(job)
        if self._fails:
            raise RuntimeError("webhook sender broke")


async def announced(calls, min_calls, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while len(calls) < min_calls and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(3 * FAST.reap_interval_s)  # and nothing more comes


def announcing(setup, *, fails: bool = False):
    """Runs `setup(store)` before the runner starts, then collects what the runner announces."""
    calls, other_calls = [], []

    async def main():
        services = make_services(FakeEngine())
        executors = {"fal": Announced(services, calls, fails), "other": Announced(services, other_calls)}
        expected = await setup(services.store)
        runner = JobRunner(services.store, "runner-1", executors, FAST)
        runner.start()
        try:
            await announced(other_calls if fails else calls, expected)
        finally:
            await runner.stop(0)

    asyncio.run(main())
    return calls, other_calls


def test_the_runner_announces_the_notify_jobs_it_ran():
    ran, quiet = fal_job(), fal_job()
    ran.notify = True

    async def setup(store):
        for j in (ran, quiet):
            await store.enqueue(j, Limits(rate_per_minute=60, max_concurrent=10), cap_pending=False)
        return 1

    calls, _ = announcing(setup)
    assert [(j.id, j.status) for j in calls] == [(ran.id, JobStatus.SUCCEEDED)]  # once; `quiet` never
    assert calls[0].result.text == "w0 w1 w2 w3 w4 "


def test_a_job_the_store_ended_is_announced_too():
    cancelled = fal_job()
    cancelled.notify = True

    async def setup(store):
        await store.enqueue(cancelled, Limits(rate_per_minute=60, max_concurrent=10), cap_pending=False)
        assert await store.cancel(cancelled.id, "alice") == CancelOutcome.CANCELLED  # no runner saw it end
        return 1

    calls, _ = announcing(setup)
    assert [(j.id, j.status, j.error.kind) for j in calls] == [(cancelled.id, JobStatus.CANCELLED, "cancelled")]


def test_one_executor_failing_does_not_stop_the_next():
    first, second = fal_job(), fal_job().model_copy(update={"api": "other"})
    first.notify = second.notify = True

    async def setup(store):
        for j in (first, second):  # ended in this order: `first` is handed out first
            await store.enqueue(j, Limits(rate_per_minute=60, max_concurrent=10), cap_pending=False)
            await store.cancel(j.id, "alice")
        return 1

    calls, other_calls = announcing(setup, fails=True)
    assert [j.id for j in calls] == [first.id] and [j.id for j in other_calls] == [second.id]


def draining(engine, cfg, body):
    """Runs `body(store, runner)` with a started runner; `body` stops it (the drain under test)."""
    async def main():
        services = make_services(engine)
        runner = JobRunner(services.store, "runner-1", {"fal": FalExecutor(services)}, cfg)
        runner.start()
        try:
            return await body(services.store, runner)
        finally:
            await runner.stop(0)  # a no-op once `body` stopped it

    return asyncio.run(main())


def test_stop_lets_a_running_job_finish_within_the_bound_and_claims_nothing_more():
    engine = SlowEngine(delay=0.05)
    limits = Limits(rate_per_minute=60, max_concurrent=10)

    async def body(store, runner):
        running = fal_job(max_new_tokens=30)  # ~1.5 s
        await store.enqueue(running, limits, cap_pending=False)
        await until(store, running, "alice", {JobStatus.RUNNING})
        started = asyncio.get_running_loop().time()
        stopping = asyncio.create_task(runner.stop(10.0))
        await asyncio.sleep(0)  # stop() has begun: from here on nothing is claimed
        queued = fal_job()
        await store.enqueue(queued, limits, cap_pending=False)
        await stopping
        took = asyncio.get_running_loop().time() - started
        await asyncio.sleep(5 * FAST.runner_retry_s)  # the loop is gone: the queued job stays queued
        return took, await store.get(running.id, "alice"), await store.get(queued.id, "alice")

    took, done, queued = draining(engine, FAST, body)
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 1, done.error
    assert done.result.num_output_tokens == 30 and done.result.text.endswith("t29 ")
    assert engine.cancelled == 0
    assert took < 5.0  # it returned when the job ended, not at the bound
    assert queued.status == JobStatus.QUEUED and queued.runner is None and queued.attempts == 0


def test_a_job_longer_than_the_bound_is_abandoned_to_its_lease():
    engine = SlowEngine(delay=0.05)
    cfg = FAST.model_copy(update={"runner_max_parallel": 1})
    limits = Limits(rate_per_minute=60, max_concurrent=10)

    async def body(store, runner):
        long, waiting = fal_job(max_new_tokens=400), fal_job()  # ~20 s; queued behind it (one at a time)
        for j in (long, waiting):
            await store.enqueue(j, limits, cap_pending=False)
        await until(store, long, "alice", {JobStatus.RUNNING})
        started = asyncio.get_running_loop().time()
        await runner.stop(0.5)
        took = asyncio.get_running_loop().time() - started
        return took, time.time(), await store.get(long.id, "alice"), await store.get(waiting.id, "alice")

    took, stopped_at, left, waiting = draining(engine, cfg, body)
    assert 0.5 <= took < 3.0
    # Not recorded as failed or cancelled: still RUNNING under this runner's lease, which the drain kept
    # renewing; once it expires the job is re-queued and another replica runs it again.
    assert left.status == JobStatus.RUNNING and left.runner.startswith("runner-1#") and left.attempts == 1
    assert left.error is None and left.result is None and left.finished_at is None
    assert left.lease_until > stopped_at
    assert engine.cancelled == 1  # its engine request was aborted
    assert waiting.status == JobStatus.QUEUED and waiting.runner is None and waiting.attempts == 0


def test_the_drain_bound_leaves_serve_time_to_finish_the_replica():
    assert drain_budget_s(20.0) == 16.0  # Serve's default grace: 2 s drain loop before, 2 s margin after
    assert drain_budget_s(3.0) == 0.0


class RemoteLikeStore:
    """The reference store with a few ms per call, as the Ray actor or Redis take (every call awaits)."""

    def __init__(self, store):
        self._store = store

    def __getattr__(self, name):
        op = getattr(self._store, name)

        async def call(*args, **kwargs):
            await asyncio.sleep(0.003)
            return await op(*args, **kwargs)

        return call


def test_a_full_runner_claims_again_as_soon_as_its_job_ends_not_at_the_next_reap():
    from serve.jobs.memory import MemoryStore

    cfg = FAST.model_copy(update={"runner_max_parallel": 1, "reap_interval_s": 5.0})
    limits = Limits(rate_per_minute=60, max_concurrent=10)

    async def main():
        services = make_services(FakeEngine(), backend=RemoteLikeStore(MemoryStore(3600.0, 2)))
        runner = JobRunner(services.store, "runner-1", {"fal": FalExecutor(services)}, cfg)
        runner.start()
        try:
            first, second = fal_job(), fal_job()
            for j in (first, second):
                await services.store.enqueue(j, limits, cap_pending=False)
            await asyncio.sleep(0.5)  # past the first reap, so only the wake-ups can start the second
            done = [await until(services.store, j, "alice", {JobStatus.SUCCEEDED}) for j in (first, second)]
        finally:
            await runner.stop(0)
        return done

    first, second = asyncio.run(main())
    assert first.status == second.status == JobStatus.SUCCEEDED
    # One at a time, and the second claimed within moments of the first's end (the reap is 5 s away).
    assert first.finished_at <= second.started_at < first.finished_at + 0.5
