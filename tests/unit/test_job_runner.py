"""JobRunner with the in-process store and fake engines: lifecycle, errors kept for replay, cancel, caps."""

import asyncio
import uuid

from serve.api.fal.jobs import FalExecutor
from serve.config import JobsConfig
from serve.jobs.models import CancelOutcome, Job, JobStatus, Limits
from serve.jobs.runner import JobRunner
from tests.conftest import data_uri
from tests.fakes import FakeEngine, SlowEngine, make_services

FAST = JobsConfig(lease_s=3.0, runner_poll_interval_s=0.01, reap_interval_s=0.1)


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
            await runner.stop()

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


def test_failures_are_recorded_with_the_fal_error_to_replay():
    async def body(store):
        limits = Limits(rate_per_minute=60, max_concurrent=10)
        bad_image, no_prompt = fal_job(image_url="data:image/png;base64,aGVsbG8="), fal_job()
        no_prompt.input.pop("prompt")
        for j in (bad_image, no_prompt):
            await store.enqueue(j, limits, cap_pending=False)
        return [await until(store, j, "alice", {JobStatus.FAILED, JobStatus.SUCCEEDED}) for j in (bad_image, no_prompt)]

    bad_image, no_prompt = with_runner(FakeEngine(), body)
    assert bad_image.status == JobStatus.FAILED and bad_image.error.kind == "image_load"
    assert bad_image.error.detail["status_code"] == 422
    assert bad_image.error.detail["body"]["detail"][0]["type"] == "image_load_error"
    assert no_prompt.error.kind == "validation"
    assert no_prompt.error.detail["body"]["detail"][0]["loc"] == ["body", "prompt"]


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
