"""One conformance suite, run against every JobStore backend, with an injected clock.

memory: the reference semantics in-process; ray_actor: the named actor in the live test cluster;
redis: a real redis-server started by the fixture.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from serve.jobs.models import CancelOutcome, Job, JobError, JobResult, JobStatus, Limits
from serve.jobs.store import JobStore, LocalBackend, MemoryStore, RayActorBackend

TTL = 3600.0
LEASE = 30.0





@pytest.fixture(params=["memory", "ray_actor", "redis"])
def store(request, clock):
    if request.param == "memory":
        yield JobStore(LocalBackend(MemoryStore(TTL, max_attempts=2)), clock)
    elif request.param == "redis":
        from serve.jobs.redis_store import RedisBackend

        url = request.getfixturevalue("redis_url")  # one server; each test gets its own key prefix
        yield JobStore(RedisBackend(url, TTL, max_attempts=2, prefix=f"test-{uuid.uuid4().hex}"), clock)
    else:
        import ray

        request.getfixturevalue("stack")  # the live test cluster
        name = f"test-store-{uuid.uuid4().hex}"
        yield JobStore(RayActorBackend(name, TTL, max_attempts=2), clock)
        ray.kill(ray.get_actor(name, namespace="llava-serve"))


def run(coro):
    return asyncio.run(coro)


def job(owner="alice", cap=10, **kw) -> Job:
    return Job(id=str(uuid.uuid4()), owner=owner, api="fal", input={"prompt": "hi"}, max_concurrent=cap,
               created_at=0.0, **kw)


RESULT = JobResult(chunks=["a", "b"], num_input_tokens=600, num_output_tokens=2, finish_reason="length")
L = Limits(rate_per_minute=5, max_concurrent=2)


# -- limits -----------------------------------------------------------------------------------


def test_rate_window_is_exact_and_rolling(store, clock):
    for i in range(5):
        adm = run(store.admit("alice", Limits(rate_per_minute=5, max_concurrent=99), LEASE))
        assert adm.allowed and adm.remaining == 4 - i
        clock.advance(10)  # admissions at t=0,10,20,30,40
    refused = run(store.admit("alice", Limits(rate_per_minute=5, max_concurrent=99), LEASE))
    assert not refused.allowed and refused.reason == "rate" and refused.remaining == 0
    assert refused.retry_after_s == pytest.approx(10.0)  # t=50: the t=0 admission leaves at t=60
    assert refused.retry_after == 10
    clock.advance(9.999)
    assert not run(store.admit("alice", Limits(rate_per_minute=5, max_concurrent=99), LEASE)).allowed
    clock.advance(0.002)  # just past t=60: exactly one slot in the window freed
    assert run(store.admit("alice", Limits(rate_per_minute=5, max_concurrent=99), LEASE)).allowed
    assert not run(store.admit("alice", Limits(rate_per_minute=5, max_concurrent=99), LEASE)).allowed


def test_refusals_consume_no_quota_and_keys_are_independent(store, clock):
    limits = Limits(rate_per_minute=2, max_concurrent=99)
    assert run(store.admit("alice", limits, LEASE)).allowed
    assert run(store.admit("alice", limits, LEASE)).allowed
    for _ in range(5):
        assert not run(store.admit("alice", limits, LEASE)).allowed
    assert run(store.admit("bob", limits, LEASE)).allowed
    clock.advance(60.001)
    assert run(store.admit("alice", limits, LEASE)).allowed  # the refusals did not extend the wait


def test_concurrency_cap_and_release(store):
    limits = Limits(rate_per_minute=100, max_concurrent=2)
    a = run(store.admit("alice", limits, LEASE))
    b = run(store.admit("alice", limits, LEASE))
    assert a.allowed and b.allowed and a.slot != b.slot
    c = run(store.admit("alice", limits, LEASE))
    assert not c.allowed and c.reason == "concurrency" and c.retry_after >= 1
    run(store.release("alice", a.slot))
    assert run(store.admit("alice", limits, LEASE)).allowed


def test_slots_are_leases(store, clock):
    limits = Limits(rate_per_minute=100, max_concurrent=1)
    held = run(store.admit("alice", limits, lease_s=10))
    clock.advance(8)
    assert run(store.renew("alice", held.slot, 10))
    clock.advance(8)
    assert not run(store.admit("alice", limits, LEASE)).allowed  # renewed: still held
    clock.advance(10.1)  # the holder died and stopped renewing
    assert run(store.admit("alice", limits, LEASE)).allowed
    assert not run(store.renew("alice", held.slot, 10))


# -- jobs -------------------------------------------------------------------------------------


def test_fifo_queue_positions_and_claim(store):
    jobs = [job(owner) for owner in ("alice", "bob", "alice")]
    positions = [run(store.enqueue(j, L, cap_pending=False)).queue_position for j in jobs]
    assert positions == [0, 1, 2]
    assert run(store.get(jobs[2].id, "alice")).queue_position == 2
    claimed = run(store.claim("r1", LEASE))
    assert claimed.id == jobs[0].id and claimed.status == JobStatus.RUNNING and claimed.attempts == 1
    assert run(store.get(jobs[2].id, "alice")).queue_position == 1
    assert run(store.get(jobs[0].id, "alice")).queue_position is None


def test_counts_of_queued_and_running_jobs(store):
    assert run(store.counts()) == {"queued": 0, "running": 0}
    jobs = [job(owner) for owner in ("alice", "bob", "carol")]
    for j in jobs:
        run(store.enqueue(j, L, cap_pending=False))
    claimed = run(store.claim("r1", LEASE))
    assert run(store.counts()) == {"queued": 2, "running": 1}
    run(store.finish(claimed.id, "r1", result=RESULT))
    run(store.cancel(jobs[2].id, "carol"))
    assert run(store.counts()) == {"queued": 1, "running": 0}  # ended jobs are neither


def test_claim_skips_owners_at_their_cap(store):
    a1, a2, b1 = job("alice", cap=1), job("alice", cap=1), job("bob", cap=1)
    for j in (a1, a2, b1):
        assert run(store.enqueue(j, L, cap_pending=False)).allowed
    assert run(store.claim("r1", LEASE)).id == a1.id
    assert run(store.claim("r1", LEASE)).id == b1.id  # a2 waits: alice is at her cap
    assert run(store.claim("r1", LEASE)) is None
    assert run(store.finish(a1.id, "r1", result=RESULT))
    assert run(store.claim("r2", LEASE)).id == a2.id


def test_running_jobs_and_sync_requests_share_the_cap(store):
    limits = Limits(rate_per_minute=100, max_concurrent=1)
    j = job("alice", cap=1)
    run(store.enqueue(j, limits, cap_pending=False))
    assert run(store.claim("r1", LEASE)).id == j.id
    assert run(store.admit("alice", limits, LEASE)).reason == "concurrency"


def test_cap_pending_counts_queued_jobs(store):
    limits = Limits(rate_per_minute=100, max_concurrent=2)
    assert run(store.enqueue(job(cap=2), limits, cap_pending=True)).allowed
    assert run(store.enqueue(job(cap=2), limits, cap_pending=True)).allowed
    refused = run(store.enqueue(job(cap=2), limits, cap_pending=True))
    assert not refused.allowed and refused.reason == "concurrency"
    # fal's queue never refuses for concurrency: jobs wait instead.
    assert run(store.enqueue(job(cap=2), limits, cap_pending=False)).allowed


def test_enqueue_counts_against_the_rate(store):
    limits = Limits(rate_per_minute=2, max_concurrent=10)
    assert run(store.enqueue(job(), limits, cap_pending=False)).allowed
    assert run(store.admit("alice", limits, LEASE)).allowed
    refused = run(store.enqueue(job(), limits, cap_pending=False))
    assert not refused.allowed and refused.reason == "rate"


def test_finish_logs_and_ownership(store, clock):
    j = job()
    run(store.enqueue(j, L, cap_pending=False))
    run(store.claim("r1", LEASE))
    run(store.log(j.id, "r1", "Image fetched"))
    run(store.log(j.id, "r2", "not the runner: ignored"))
    clock.advance(2)
    assert not run(store.finish(j.id, "r2", result=RESULT))  # only the lease holder decides
    assert run(store.finish(j.id, "r1", result=RESULT))
    done = run(store.get(j.id, "alice"))
    assert done.status == JobStatus.SUCCEEDED and done.result.text == "ab"
    assert [line.message for line in done.logs] == ["Image fetched"]
    assert done.finished_at == clock.now and done.expires_at == clock.now + TTL
    assert run(store.get(j.id, "mallory")) is None  # another key's job does not exist for it
    assert run(store.get("no-such-id", "alice")) is None


def test_a_brief_read_is_the_job_less_its_input_and_result(store, clock):
    big = job().model_copy(update={"input": {"prompt": "hi", "image_url": "data:image/png;base64," + "A" * 200_000}})
    run(store.enqueue(big, L, cap_pending=False))
    queued = run(store.get(big.id, "alice", brief=True))
    assert queued.input == {} and queued.status == JobStatus.QUEUED and queued.queue_position == 0
    run(store.claim("r1", LEASE))
    run(store.log(big.id, "r1", "Image fetched"))
    clock.advance(2)
    run(store.finish(big.id, "r1", result=RESULT))
    full, brief = run(store.get(big.id, "alice")), run(store.get(big.id, "alice", brief=True))
    assert full.input == big.input and full.result == RESULT  # the full read is untouched
    assert brief.input == {} and brief.result is None
    assert brief == full.model_copy(update={"input": {}, "result": None})  # everything else is the same
    assert run(store.get(big.id, "mallory", brief=True)) is None


def test_failures_keep_their_error(store):
    j = job()
    run(store.enqueue(j, L, cap_pending=False))
    run(store.claim("r1", LEASE))
    err = JobError(kind="image_load", message="not an image", detail=[{"loc": ["body", "image_url"]}])
    assert run(store.finish(j.id, "r1", error=err))
    failed = run(store.get(j.id, "alice"))
    assert failed.status == JobStatus.FAILED and failed.error == err and failed.result is None


def test_cancel_queued_running_done_and_foreign(store):
    queued, running = job(), job()
    run(store.enqueue(running, L, cap_pending=False))
    run(store.enqueue(queued, L, cap_pending=False))
    run(store.claim("r1", LEASE))
    assert run(store.cancel(queued.id, "mallory")) == CancelOutcome.NOT_FOUND
    assert run(store.cancel(queued.id, "alice")) == CancelOutcome.CANCELLED
    assert run(store.get(queued.id, "alice")).status == JobStatus.CANCELLED
    assert run(store.claim("r2", LEASE)) is None  # removed from the queue
    assert run(store.cancel(running.id, "alice")) == CancelOutcome.REQUESTED
    assert run(store.heartbeat(running.id, "r1", LEASE)) is False  # the runner learns it must stop
    assert run(store.finish(running.id, "r1", error=JobError(kind="cancelled", message="Cancelled.")))
    assert run(store.get(running.id, "alice")).status == JobStatus.CANCELLED
    assert run(store.cancel(running.id, "alice")) == CancelOutcome.ALREADY_DONE
    assert run(store.cancel("no-such-id", "alice")) == CancelOutcome.NOT_FOUND


def test_a_lost_worker_is_requeued_once_then_failed(store, clock):
    j, later = job(cap=1), job(cap=1)
    run(store.enqueue(j, L, cap_pending=False))
    run(store.claim("r1", LEASE))
    run(store.enqueue(later, L, cap_pending=False))
    clock.advance(LEASE - 1)
    assert run(store.heartbeat(j.id, "r1", LEASE))
    clock.advance(LEASE + 1)  # r1 died: no heartbeat for longer than the lease
    assert run(store.reap()) == 1
    requeued = run(store.get(j.id, "alice"))
    assert requeued.status == JobStatus.QUEUED and requeued.queue_position == 0  # ahead of newer work
    assert "Worker lost" in requeued.logs[-1].message
    again = run(store.claim("r2", LEASE))
    assert again.id == j.id and again.attempts == 2
    assert not run(store.finish(j.id, "r1", result=RESULT))  # the dead runner's late answer is refused
    clock.advance(LEASE + 1)
    run(store.reap())
    lost = run(store.get(j.id, "alice"))
    assert lost.status == JobStatus.FAILED and lost.error.kind == "worker_lost"
    assert run(store.claim("r3", LEASE)).id == later.id  # the slot was freed


def test_results_expire_after_the_ttl(store, clock):
    j = job()
    run(store.enqueue(j, L, cap_pending=False))
    run(store.claim("r1", LEASE))
    run(store.finish(j.id, "r1", result=RESULT))
    clock.advance(TTL - 1)
    assert run(store.get(j.id, "alice")) is not None
    clock.advance(2)
    run(store.reap())
    assert run(store.get(j.id, "alice")) is None
    assert run(store.cancel(j.id, "alice")) == CancelOutcome.NOT_FOUND


def test_a_lapsed_lease_cannot_be_renewed_over_the_cap(store, clock):
    limits = Limits(rate_per_minute=100, max_concurrent=1)
    late = run(store.admit("alice", limits, lease_s=10))
    clock.advance(10.5)  # the holder missed its renewal: the slot is free
    assert not run(store.renew("alice", late.slot, 10))
    assert run(store.admit("alice", limits, LEASE)).allowed  # and stays the only one in flight
    assert run(store.admit("alice", limits, LEASE)).reason == "concurrency"


def test_a_late_heartbeat_loses_the_job(store, clock):
    j = job(cap=1)
    run(store.enqueue(j, L, cap_pending=False))
    run(store.claim("r1", LEASE))
    clock.advance(LEASE + 0.5)
    assert run(store.admit("alice", Limits(rate_per_minute=100, max_concurrent=1), LEASE)).allowed
    assert run(store.heartbeat(j.id, "r1", LEASE)) is False  # not re-taken on top of the new holder
    assert run(store.admit("alice", Limits(rate_per_minute=100, max_concurrent=1), LEASE)).reason == "concurrency"
    # The runner stops; its outcome is refused too (it is not cancelled), and reap re-queues the job.
    assert run(store.finish(j.id, "r1", error=JobError(kind="cancelled", message="Cancelled."))) is False
    run(store.reap())
    assert run(store.get(j.id, "alice")).status == JobStatus.QUEUED


def test_lost_jobs_go_back_in_accept_order_ahead_of_newer_work(store, clock):
    lost = [job(), job(), job()]
    for j in lost:
        run(store.enqueue(j, L, cap_pending=False))
    for _ in lost:
        run(store.claim("r1", LEASE))
    newer = job()
    run(store.enqueue(newer, L, cap_pending=False))
    clock.advance(LEASE + 1)
    assert run(store.reap()) == 3
    order = [run(store.claim("r2", LEASE)).id for _ in range(4)]
    assert order == [j.id for j in lost] + [newer.id]


# -- start deadlines (X-Fal-Request-Timeout) ----------------------------------------------------


def test_reap_fails_a_queued_job_past_its_start_deadline(store, clock):
    blocker, waiting, later = job(cap=1), job(cap=1, start_timeout_s=10.0), job(cap=1)
    for j in (blocker, waiting, later):
        run(store.enqueue(j, L, cap_pending=False))
    assert run(store.get(waiting.id, "alice")).start_timeout_s == 10.0
    run(store.claim("r1", LEASE))  # alice is at her cap: `waiting` stays queued
    assert run(store.get(later.id, "alice")).queue_position == 1
    clock.advance(9.999)
    assert run(store.reap()) == 0
    clock.advance(0.001)  # exactly the deadline: no longer startable
    assert run(store.reap()) == 1
    failed = run(store.get(waiting.id, "alice"))
    assert failed.status == JobStatus.FAILED and failed.error.kind == "start_timeout"
    assert failed.started_at is None and failed.attempts == 0 and failed.queue_position is None
    assert failed.finished_at == clock.now and failed.expires_at == clock.now + TTL
    assert run(store.get(later.id, "alice")).queue_position == 0  # the rest move up
    assert run(store.cancel(waiting.id, "alice")) == CancelOutcome.ALREADY_DONE
    clock.advance(TTL + 1)
    run(store.reap())
    assert run(store.get(waiting.id, "alice")) is None  # forgotten like any other result


def test_claim_fails_an_overdue_job_and_claims_the_next(store, clock):
    overdue, fresh = job(start_timeout_s=5.0), job(start_timeout_s=100.0)
    run(store.enqueue(overdue, L, cap_pending=False))
    run(store.enqueue(fresh, L, cap_pending=False))
    clock.advance(5)
    assert run(store.claim("r1", LEASE)).id == fresh.id
    failed = run(store.get(overdue.id, "alice"))
    assert failed.status == JobStatus.FAILED and failed.error.kind == "start_timeout"
    assert run(store.claim("r1", LEASE)) is None
    assert run(store.reap()) == 0  # already failed: reap has nothing left to do


def test_a_job_started_in_time_is_unaffected(store, clock):
    j = job(start_timeout_s=5.0)
    run(store.enqueue(j, L, cap_pending=False))
    clock.advance(4)
    assert run(store.claim("r1", LEASE)).id == j.id
    clock.advance(10)
    assert run(store.reap()) == 0
    assert run(store.finish(j.id, "r1", result=RESULT))
    assert run(store.get(j.id, "alice")).status == JobStatus.SUCCEEDED


def test_a_requeued_job_has_started_and_does_not_time_out(store, clock):
    j = job(start_timeout_s=5.0)
    run(store.enqueue(j, L, cap_pending=False))
    assert run(store.claim("r1", LEASE)).id == j.id
    clock.advance(LEASE + 1)  # r1 died: the job goes back to the queue, long past its start deadline
    assert run(store.reap()) == 1
    assert run(store.get(j.id, "alice")).status == JobStatus.QUEUED
    assert run(store.reap()) == 0
    again = run(store.claim("r2", LEASE))
    assert again.id == j.id and again.attempts == 2


def test_no_start_timeout_waits_forever(store, clock):
    blocker, waiting = job(cap=1), job(cap=1)
    run(store.enqueue(blocker, L, cap_pending=False))
    run(store.enqueue(waiting, L, cap_pending=False))
    run(store.claim("r1", LEASE))
    for _ in range(3):
        clock.advance(LEASE - 1)
        assert run(store.heartbeat(blocker.id, "r1", LEASE))
    assert run(store.reap()) == 0
    assert run(store.get(waiting.id, "alice")).status == JobStatus.QUEUED
    assert run(store.finish(blocker.id, "r1", result=RESULT))
    assert run(store.claim("r2", LEASE)).id == waiting.id


# -- the completion outbox (webhooks) -------------------------------------------------------------


def test_every_end_of_a_notify_job_is_handed_out_once_in_order(store, clock):
    ran, cancelled, lost, late = job(notify=True), job(notify=True), job(notify=True), job(notify=True,
                                                                                             start_timeout_s=50.0)
    quiet = job()  # no notify: never announced
    for j in (ran, quiet, lost):
        run(store.enqueue(j, L, cap_pending=False))
    assert [run(store.claim("r1", LEASE)).id for _ in range(3)] == [ran.id, quiet.id, lost.id]
    run(store.enqueue(cancelled, L, cap_pending=False))
    run(store.enqueue(late, L, cap_pending=False))

    clock.advance(1)
    assert run(store.finish(ran.id, "r1", result=RESULT))
    assert run(store.finish(quiet.id, "r1", result=RESULT))
    clock.advance(1)
    assert run(store.cancel(cancelled.id, "alice")) == CancelOutcome.CANCELLED
    clock.advance(LEASE)  # r1 died holding `lost`: re-queued, then lost again at its last attempt
    assert run(store.reap()) == 1
    assert run(store.claim("r2", LEASE)).id == lost.id  # `late` stays queued behind it
    clock.advance(LEASE + 1)
    run(store.reap())  # fails `lost` (worker lost), then `late` (past its start deadline)

    taken = run(store.take_finished(limit=10))
    assert [j.id for j in taken] == [ran.id, cancelled.id, lost.id, late.id]  # the order they ended
    assert [(j.status, j.error and j.error.kind) for j in taken] == [
        (JobStatus.SUCCEEDED, None), (JobStatus.CANCELLED, "cancelled"),
        (JobStatus.FAILED, "worker_lost"), (JobStatus.FAILED, "start_timeout")]
    assert taken[0].result.text == "ab" and all(j.notify and j.queue_position is None for j in taken)
    assert taken[0] == run(store.get(ran.id, "alice"))  # the terminal record, as `get` returns it
    assert run(store.take_finished()) == []  # each is handed out once


def test_take_finished_honours_the_limit_and_claims_expiry_notifies_too(store, clock):
    overdue = [job(notify=True, start_timeout_s=5.0) for _ in range(3)]
    for j in overdue:
        run(store.enqueue(j, L, cap_pending=False))
    clock.advance(5)
    assert run(store.claim("r1", LEASE)) is None  # claim fails them all: the queue is empty
    first = run(store.take_finished(limit=2))
    assert [j.id for j in first] == [j.id for j in overdue[:2]]  # queue order
    assert [j.id for j in run(store.take_finished(limit=2))] == [overdue[2].id]
    assert run(store.take_finished(limit=2)) == []


def test_a_forgotten_job_is_skipped(store, clock):
    forgotten, kept = job(notify=True), job(notify=True)
    run(store.enqueue(forgotten, L, cap_pending=False))
    run(store.cancel(forgotten.id, "alice"))
    clock.advance(TTL + 1)
    run(store.reap())  # forgets it before anyone took it
    run(store.enqueue(kept, L, cap_pending=False))
    run(store.cancel(kept.id, "alice"))
    assert [j.id for j in run(store.take_finished())] == [kept.id]


def test_renotify_offers_an_ended_job_again_and_nothing_else(store):
    ended, waiting = job(notify=True), job()
    for j in (ended, waiting):
        run(store.enqueue(j, L, cap_pending=False))
    run(store.cancel(ended.id, "alice"))
    assert [j.id for j in run(store.take_finished())] == [ended.id]
    run(store.renotify(ended.id))  # its delivery was cut short: offered once more
    run(store.renotify(waiting.id))  # not ended: nothing to announce
    run(store.renotify("no-such-job"))
    again = run(store.take_finished())
    assert [j.id for j in again] == [ended.id] and again[0].status == JobStatus.CANCELLED
    assert run(store.take_finished()) == []
