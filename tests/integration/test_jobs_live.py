"""Jobs on the live stack: runners in the ingress replicas, cancellation, and a runner that dies."""

from __future__ import annotations

import asyncio
import time
import uuid

import ray

from serve.jobs.models import CancelOutcome, Job, JobStatus, Limits
from tests.conftest import data_uri
from tests.integration.conftest import replica_of, wait_for_abort

LIMITS = Limits(rate_per_minute=100_000, max_concurrent=64)


def submit(store, max_new_tokens):
    job = Job(id=str(uuid.uuid4()), owner="local-dev", api="fal", max_concurrent=LIMITS.max_concurrent,
              created_at=0.0, input={"prompt": "Describe", "image_url": data_uri(), "max_new_tokens": max_new_tokens,
                                     "temperature": 0})
    assert asyncio.run(store.enqueue(job, LIMITS, cap_pending=False)).allowed
    return job


def wait(store, job, statuses, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        got = asyncio.run(store.get(job.id, "local-dev"))
        if got.status in statuses or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


def test_a_queued_job_runs_on_a_replica(job_store):
    done = wait(job_store, submit(job_store, 16), TERMINAL)
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert done.result.num_output_tokens == 16 and len(done.result.text) == 16
    assert done.result.num_input_tokens > 576
    assert [line.message.split(" ")[0] for line in done.logs] == ["Image", "Generating", "Generated"]
    assert done.started_at <= done.finished_at and done.expires_at > done.finished_at


def test_cancelling_a_running_job_aborts_it_in_the_engine(job_store, engine_stats):
    before = engine_stats()
    job = submit(job_store, 2048)
    assert wait(job_store, job, {JobStatus.RUNNING}).status == JobStatus.RUNNING
    time.sleep(0.5)
    assert asyncio.run(job_store.cancel(job.id, "local-dev")) == CancelOutcome.REQUESTED
    done = wait(job_store, job, TERMINAL, timeout=15)
    assert done.status == JobStatus.CANCELLED
    after = wait_for_abort(engine_stats, before)
    assert after["aborted"] == before["aborted"] + 1


def test_a_job_whose_replica_dies_is_recovered(job_store):
    job = submit(job_store, 1024)
    running = wait(job_store, job, {JobStatus.RUNNING})
    assert running.runner.startswith("SERVE_REPLICA::")
    ray.kill(ray.get_actor(replica_of(running), namespace="serve"))  # the replica running it dies
    done = wait(job_store, job, TERMINAL, timeout=90)
    # Re-queued once after its lease expired, then run to the end by a live replica.
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert done.attempts == 2 and "Worker lost; re-queued." in [line.message for line in done.logs]
    assert done.result.num_output_tokens == 1024
