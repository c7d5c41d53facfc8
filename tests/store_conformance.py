"""The store's conformance suite: every `StoreBackend` must answer it alike, with an injected clock.

Not collected itself (no test_ prefix): tests/unit/test_memory_store.py runs it on the reference
MemoryStore, tests/integration/test_store_conformance.py on the Ray actor and Redis. A subclass
provides the `store` fixture (a JobStore over its backend, on the `clock` fixture). Every test runs
on the session's one event loop, like the service (one loop per replica).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from serve.jobs.models import (
    REQUEUED,
    CancelOutcome,
    Job,
    JobError,
    JobResult,
    JobStatus,
    Limits,
    Problem,
    abridge_long_strings,
    input_bytes,
)
from serve.jobs.store import JobStore
from tests.conftest import Clock

TTL = 3600.0
LEASE = 30.0


def job(owner="alice", cap=10, **kw) -> Job:
    return Job(id=str(uuid.uuid4()), owner=owner, api="fal", input={"prompt": "hi"}, max_concurrent=cap,
               created_at=0.0, **kw)


RESULT = JobResult(chunks=["a", "b"], num_input_tokens=600, num_output_tokens=2, finish_reason="length")
L = Limits(rate_per_minute=5, max_concurrent=2)
ENGINE_LOST = JobError(kind="unavailable", message="The engine replica serving this request stopped.")
IMAGE = "data:image/png;base64," + "A" * 200_000  # an image sent inline: what the stored-bytes bound is about


def with_image(j: Job) -> Job:
    return j.model_copy(update={"input": {"prompt": "hi", "image_url": IMAGE}})


class StoreConformance:
    pytestmark = pytest.mark.asyncio(loop_scope="session")

    @pytest.fixture
    def clock(self) -> Clock:
        return Clock()

    # -- limits -----------------------------------------------------------------------------------

    async def test_rate_window_is_exact_and_rolling(self, store, clock):
        for i in range(5):
            adm = await store.admit("alice", Limits(rate_per_minute=5, max_concurrent=99), LEASE)
            assert adm.allowed and adm.remaining == 4 - i
            clock.advance(10)  # admissions at t=0,10,20,30,40
        refused = await store.admit("alice", Limits(rate_per_minute=5, max_concurrent=99), LEASE)
        assert not refused.allowed and refused.reason == "rate" and refused.remaining == 0
        assert refused.retry_after_s == pytest.approx(10.0)  # t=50: the t=0 admission leaves at t=60
        assert refused.retry_after == 10
        clock.advance(9.999)
        assert not (await store.admit("alice", Limits(rate_per_minute=5, max_concurrent=99), LEASE)).allowed
        clock.advance(0.002)  # just past t=60: exactly one slot in the window freed
        assert (await store.admit("alice", Limits(rate_per_minute=5, max_concurrent=99), LEASE)).allowed
        assert not (await store.admit("alice", Limits(rate_per_minute=5, max_concurrent=99), LEASE)).allowed

    async def test_refusals_consume_no_quota_and_keys_are_independent(self, store, clock):
        limits = Limits(rate_per_minute=2, max_concurrent=99)
        assert (await store.admit("alice", limits, LEASE)).allowed
        assert (await store.admit("alice", limits, LEASE)).allowed
        for _ in range(5):
            assert not (await store.admit("alice", limits, LEASE)).allowed
        assert (await store.admit("bob", limits, LEASE)).allowed
        clock.advance(60.001)
        assert (await store.admit("alice", limits, LEASE)).allowed  # the refusals did not extend the wait

    async def test_concurrency_cap_and_release(self, store):
        limits = Limits(rate_per_minute=100, max_concurrent=2)
        a = await store.admit("alice", limits, LEASE)
        b = await store.admit("alice", limits, LEASE)
        assert a.allowed and b.allowed and a.slot != b.slot
        c = await store.admit("alice", limits, LEASE)
        assert not c.allowed and c.reason == "concurrency" and c.retry_after >= 1
        await store.release("alice", a.slot)
        assert (await store.admit("alice", limits, LEASE)).allowed

    async def test_slots_are_leases(self, store, clock):
        limits = Limits(rate_per_minute=100, max_concurrent=1)
        held = await store.admit("alice", limits, lease_s=10)
        clock.advance(8)
        assert await store.renew("alice", held.slot, 10)
        clock.advance(8)
        assert not (await store.admit("alice", limits, LEASE)).allowed  # renewed: still held
        clock.advance(10.1)  # the holder died and stopped renewing
        assert (await store.admit("alice", limits, LEASE)).allowed
        assert not await store.renew("alice", held.slot, 10)

    # -- jobs -------------------------------------------------------------------------------------

    async def test_fifo_queue_positions_and_claim(self, store):
        jobs = [job(owner) for owner in ("alice", "bob", "alice")]
        positions = [(await store.enqueue(j, L, cap_pending=False)).queue_position for j in jobs]
        assert positions == [0, 1, 2]
        assert (await store.get(jobs[2].id, "alice")).queue_position == 2
        claimed = await store.claim("r1", LEASE)
        assert claimed.id == jobs[0].id and claimed.status == JobStatus.RUNNING and claimed.attempts == 1
        assert (await store.get(jobs[2].id, "alice")).queue_position == 1
        assert (await store.get(jobs[0].id, "alice")).queue_position is None

    async def test_counts_of_queued_and_running_jobs(self, store):
        assert await store.counts() == {"queued": 0, "running": 0}
        jobs = [job(owner) for owner in ("alice", "bob", "carol")]
        for j in jobs:
            await store.enqueue(j, L, cap_pending=False)
        claimed = await store.claim("r1", LEASE)
        assert await store.counts() == {"queued": 2, "running": 1}
        await store.finish(claimed.id, "r1", result=RESULT)
        await store.cancel(jobs[2].id, "carol")
        assert await store.counts() == {"queued": 1, "running": 0}  # ended jobs are neither

    async def test_startable_counts_queued_jobs_up_to_each_owners_room(self, store, clock):
        assert await store.startable() == 0
        # alice: 3 queued, cap 2 (2 could start); bob: 1 queued, cap 2, one slot held by a sync request (1).
        for j in [job("alice", cap=2) for _ in range(3)] + [job("bob", cap=2)]:
            await store.enqueue(j, L, cap_pending=False)
        bob_slot = await store.admit("bob", Limits(rate_per_minute=100, max_concurrent=2), LEASE)
        assert bob_slot.allowed
        assert await store.startable() == 3
        await store.claim("r1", LEASE)  # alice's first: 2 queued, one slot left
        assert await store.startable() == 2
        await store.claim("r1", LEASE)  # alice's second: at her cap
        assert await store.startable() == 1
        clock.advance(LEASE + 1)  # every slot's lease lapsed (nobody renewed): alice's last and bob's could start
        assert await store.startable() == 2

    async def test_claim_skips_owners_at_their_cap(self, store):
        a1, a2, b1 = job("alice", cap=1), job("alice", cap=1), job("bob", cap=1)
        for j in (a1, a2, b1):
            assert (await store.enqueue(j, L, cap_pending=False)).allowed
        assert (await store.claim("r1", LEASE)).id == a1.id
        assert (await store.claim("r1", LEASE)).id == b1.id  # a2 waits: alice is at her cap
        assert await store.claim("r1", LEASE) is None
        assert await store.finish(a1.id, "r1", result=RESULT)
        assert (await store.claim("r2", LEASE)).id == a2.id

    async def test_running_jobs_and_sync_requests_share_the_cap(self, store):
        limits = Limits(rate_per_minute=100, max_concurrent=1)
        j = job("alice", cap=1)
        await store.enqueue(j, limits, cap_pending=False)
        assert (await store.claim("r1", LEASE)).id == j.id
        assert (await store.admit("alice", limits, LEASE)).reason == "concurrency"

    async def test_cap_pending_counts_queued_jobs(self, store):
        limits = Limits(rate_per_minute=100, max_concurrent=2)
        assert (await store.enqueue(job(cap=2), limits, cap_pending=True)).allowed
        assert (await store.enqueue(job(cap=2), limits, cap_pending=True)).allowed
        refused = await store.enqueue(job(cap=2), limits, cap_pending=True)
        assert not refused.allowed and refused.reason == "concurrency"
        # fal's queue never refuses for concurrency: jobs wait instead.
        assert (await store.enqueue(job(cap=2), limits, cap_pending=False)).allowed

    async def test_enqueue_counts_against_the_rate(self, store):
        limits = Limits(rate_per_minute=2, max_concurrent=10)
        assert (await store.enqueue(job(), limits, cap_pending=False)).allowed
        assert (await store.admit("alice", limits, LEASE)).allowed
        refused = await store.enqueue(job(), limits, cap_pending=False)
        assert not refused.allowed and refused.reason == "rate"

    async def test_finish_logs_and_ownership(self, store, clock):
        j = job()
        await store.enqueue(j, L, cap_pending=False)
        await store.claim("r1", LEASE)
        await store.log(j.id, "r1", "Image fetched")
        await store.log(j.id, "r2", "not the runner: ignored")
        clock.advance(2)
        assert not await store.finish(j.id, "r2", result=RESULT)  # only the lease holder decides
        assert await store.finish(j.id, "r1", result=RESULT)
        done = await store.get(j.id, "alice")
        assert done.status == JobStatus.SUCCEEDED and done.result.text == "ab"
        assert [line.message for line in done.logs] == ["Image fetched"]
        assert done.finished_at == clock.now and done.expires_at == clock.now + TTL
        assert await store.get(j.id, "mallory") is None  # another key's job does not exist for it
        assert await store.get("no-such-id", "alice") is None

    async def test_reads_show_the_input_abridged_and_only_a_claim_the_full_one(self, store, clock):
        big = with_image(job())
        shown = {"prompt": "hi", "image_url": IMAGE[:64] + "… (200022 characters)"}
        await store.enqueue(big, L, cap_pending=False)
        queued = await store.get(big.id, "alice", brief=True)
        assert queued.input == shown and queued.status == JobStatus.QUEUED and queued.queue_position == 0
        assert (await store.get(big.id, "alice")).input == shown
        claimed = await store.claim("r1", LEASE)
        assert claimed.input == big.input  # the runner gets what was sent
        await store.log(big.id, "r1", "Image fetched")
        clock.advance(2)
        await store.finish(big.id, "r1", result=RESULT)
        full, brief = await store.get(big.id, "alice"), await store.get(big.id, "alice", brief=True)
        assert full.input == shown and full.result == RESULT
        assert brief.result is None and brief == full.model_copy(update={"result": None})  # the rest is the same
        assert await store.get(big.id, "mallory", brief=True) is None

    async def test_a_requeued_job_is_claimed_again_with_its_full_input(self, store, clock):
        big = with_image(job())
        await store.enqueue(big, L, cap_pending=False)
        await store.claim("r1", LEASE)
        clock.advance(LEASE + 1)  # r1 died
        assert await store.reap() == 1
        assert (await store.get(big.id, "alice")).input["image_url"].endswith("(200022 characters)")
        assert (await store.claim("r2", LEASE)).input == big.input

    async def test_an_ended_job_keeps_only_its_abridged_input(self, store, clock):
        ended = with_image(job(notify=True))
        await store.enqueue(ended, L, cap_pending=False)
        await store.cancel(ended.id, "alice")
        [announced] = await store.take_finished(LEASE)
        assert announced.input == abridge_long_strings(ended.input)  # webhooks echo what reads show

    # -- the job store's bounds (docs/bounds.md, "The job store") -----------------------------------

    async def test_pending_jobs_are_capped_per_key_and_a_refusal_records_nothing(self, store):
        limits = Limits(rate_per_minute=100, max_concurrent=1, max_pending=3)
        accepted = [await store.enqueue(job(cap=1), limits, cap_pending=False) for _ in range(3)]
        assert all(a.allowed for a in accepted)
        refused = await store.enqueue(job(cap=1), limits, cap_pending=False)
        assert not refused.allowed and refused.reason == "pending" and refused.retry_after >= 1
        assert refused.remaining == accepted[-1].remaining  # the refusal spent no rate
        assert await store.counts() == {"queued": 3, "running": 0}
        assert (await store.enqueue(job("bob", cap=1), limits, cap_pending=False)).allowed  # per key
        await store.claim("r1", LEASE)  # one of alice's starts: room for one more
        assert (await store.enqueue(job(cap=1), limits, cap_pending=False)).allowed
        assert (await store.enqueue(job(cap=1), limits, cap_pending=False)).reason == "pending"

    async def test_the_pending_cap_applies_to_capped_keys_too(self, store):
        limits = Limits(rate_per_minute=100, max_concurrent=10, max_pending=1)
        assert (await store.enqueue(job(), limits, cap_pending=True)).allowed
        assert (await store.enqueue(job(), limits, cap_pending=True)).reason == "pending"

    async def test_stored_bytes_are_capped_per_key(self, store):
        one, small = input_bytes(with_image(job()).input), input_bytes(job().input)
        limits = Limits(rate_per_minute=100, max_concurrent=1, max_stored_bytes=2 * one + small)
        assert (await store.enqueue(with_image(job(cap=1)), limits, cap_pending=False)).allowed
        assert (await store.enqueue(with_image(job(cap=1)), limits, cap_pending=False)).allowed
        refused = await store.enqueue(with_image(job(cap=1)), limits, cap_pending=False)
        assert not refused.allowed and refused.reason == "stored" and refused.retry_after >= 1
        assert await store.counts() == {"queued": 2, "running": 0}  # nothing recorded
        assert (await store.enqueue(job(cap=1), limits, cap_pending=False)).allowed  # exactly the room left
        assert (await store.enqueue(with_image(job("bob", cap=1)), limits, cap_pending=False)).allowed  # per key
        await store.claim("r1", LEASE)  # a running job's input still counts: it is not finished
        assert (await store.enqueue(with_image(job(cap=1)), limits, cap_pending=False)).reason == "stored"

    @pytest.mark.parametrize("end", ["succeeded", "failed", "cancelled_queued", "cancelled_running",
                                     "worker_lost", "engine_lost", "start_timeout_at_claim",
                                     "start_timeout_at_reap"])
    async def test_stored_bytes_are_given_back_however_a_job_ends(self, store, clock, end):
        big = with_image(job(cap=1, start_timeout_s=5.0 if end.startswith("start_timeout") else None))
        limits = Limits(rate_per_minute=100, max_concurrent=1, max_stored_bytes=input_bytes(big.input))
        assert (await store.enqueue(big, limits, cap_pending=False)).allowed
        assert (await store.enqueue(with_image(job(cap=1)), limits, cap_pending=False)).reason == "stored"
        if end in ("succeeded", "failed", "cancelled_running", "worker_lost", "engine_lost"):
            assert (await store.claim("r1", LEASE)).id == big.id
        if end == "succeeded":
            assert await store.finish(big.id, "r1", result=RESULT)
        elif end == "failed":
            assert await store.finish(big.id, "r1", error=JobError(kind="input", message="too long"))
        elif end == "cancelled_queued":
            assert await store.cancel(big.id, "alice") == CancelOutcome.CANCELLED
        elif end == "cancelled_running":
            assert await store.cancel(big.id, "alice") == CancelOutcome.REQUESTED
            assert await store.finish(big.id, "r1", error=JobError(kind="cancelled", message="Cancelled."))
        elif end == "engine_lost":  # max_attempts 2: handed back, re-queued, handed back again
            assert await store.requeue(big.id, "r1", ENGINE_LOST)
            assert (await store.claim("r2", LEASE)).id == big.id
            assert await store.requeue(big.id, "r2", ENGINE_LOST)
        elif end == "worker_lost":  # max_attempts 2: lost, re-queued, lost again
            for runner in ("r2", "r3"):
                clock.advance(LEASE + 1)
                await store.reap()
                if runner == "r2":
                    assert (await store.claim(runner, LEASE)).id == big.id
        else:
            clock.advance(5)
            if end == "start_timeout_at_claim":
                assert await store.claim("r1", LEASE) is None
            else:
                assert await store.reap() == 1
        assert (await store.get(big.id, "alice")).status.terminal
        # Back to zero: the next job may take the whole allowance again.
        assert (await store.enqueue(with_image(job(cap=1)), limits, cap_pending=False)).allowed

    async def test_a_second_key_is_claimed_at_once_behind_a_capped_backlog(self, store):
        limits = Limits(rate_per_minute=10_000, max_concurrent=1, max_pending=1000)
        backlog = [job("alice", cap=1) for _ in range(1000)]
        for j in backlog:
            assert (await store.enqueue(j, limits, cap_pending=False)).allowed
        assert (await store.claim("r1", LEASE)).id == backlog[0].id  # alice is now at her cap
        assert (await store.enqueue(job("alice", cap=1), limits, cap_pending=False)).allowed  # 1,000 pending
        assert (await store.enqueue(job("alice", cap=1), limits, cap_pending=False)).reason == "pending"
        assert await store.claim("r1", LEASE) is None
        bob = job("bob", cap=1)
        assert (await store.enqueue(bob, limits, cap_pending=False)).queue_position == 1000  # alice's all ahead
        assert (await store.claim("r2", LEASE)).id == bob.id
        assert (await store.get(backlog[-1].id, "alice")).queue_position == 998

    async def test_claims_follow_the_global_order_across_keys(self, store, clock):
        a1, b1, a2, c1, b2 = job("alice", cap=1), job("bob"), job("alice", cap=1), job("carol"), job("bob")
        for j in (a1, b1, a2, c1, b2):
            await store.enqueue(j, L, cap_pending=False)
        order = [(await store.claim("r1", LEASE)).id for _ in range(4)]
        assert order == [a1.id, b1.id, c1.id, b2.id]  # a2 waits for alice's slot
        assert (await store.get(a2.id, "alice")).queue_position == 0
        clock.advance(LEASE + 1)  # r1 died: its four jobs go back to the front, in accept order, ahead of a2
        assert await store.reap() == 4
        positions = [(await store.get(j.id, j.owner)).queue_position for j in (a1, b1, c1, b2, a2)]
        assert positions == [0, 1, 2, 3, 4]
        again = [(await store.claim("r2", LEASE)).id for _ in range(4)]
        assert again == [a1.id, b1.id, c1.id, b2.id] and await store.claim("r2", LEASE) is None

    async def test_failures_keep_their_error(self, store):
        j = job()
        await store.enqueue(j, L, cap_pending=False)
        await store.claim("r1", LEASE)
        err = JobError(kind="validation", message="bad input", problems=[
            Problem(loc=["body", "image_url"], msg="not a URL", type="url_parsing", input=None, ctx={"n": 1.5})])
        assert await store.finish(j.id, "r1", error=err)
        failed = await store.get(j.id, "alice")
        assert failed.status == JobStatus.FAILED and failed.error == err and failed.result is None

    async def test_text_and_numbers_round_trip_exactly(self, store, clock):
        clock.now = 1_700_000_000.123456  # a real epoch with fractions: no rounding anywhere
        j = job(notify=True, start_timeout_s=0.1 + 0.2).model_copy(
            update={"input": {"prompt": "caf\u00e9 \U0001f999 \"quoted\" \\ ]==] \n\t\u2028", "n": None},
                    "meta": {"webhook": "https://example.com/h?a=1&b=[2]", "empty": {}, "list": []}})
        await store.enqueue(j, L, cap_pending=False)
        assert (await store.claim("r\u00e9", LEASE)).id == j.id
        await store.log(j.id, "r\u00e9", "\u00fcber \U0001f999")
        logged_at = clock.now
        clock.advance(0.001)
        text = JobResult(chunks=["\u00e9", "\U0001f999", " \\\"", ""], num_input_tokens=1, num_output_tokens=3,
                         finish_reason="stop")
        assert await store.finish(j.id, "r\u00e9", result=text)
        done = await store.get(j.id, "alice")
        assert done.input == j.input and done.meta == j.meta and done.result == text
        assert done.start_timeout_s == 0.1 + 0.2 and done.finished_at == clock.now
        assert [line.message for line in done.logs] == ["\u00fcber \U0001f999"]
        assert done.logs[0].timestamp == logged_at

    async def test_cancel_queued_running_done_and_foreign(self, store):
        queued, running = job(), job()
        await store.enqueue(running, L, cap_pending=False)
        await store.enqueue(queued, L, cap_pending=False)
        await store.claim("r1", LEASE)
        assert await store.cancel(queued.id, "mallory") == CancelOutcome.NOT_FOUND
        assert await store.cancel(queued.id, "alice") == CancelOutcome.CANCELLED
        assert (await store.get(queued.id, "alice")).status == JobStatus.CANCELLED
        assert await store.claim("r2", LEASE) is None  # removed from the queue
        assert await store.cancel(running.id, "alice") == CancelOutcome.REQUESTED
        assert await store.heartbeat(running.id, "r1", LEASE) is False  # the runner learns it must stop
        assert await store.finish(running.id, "r1", error=JobError(kind="cancelled", message="Cancelled."))
        assert (await store.get(running.id, "alice")).status == JobStatus.CANCELLED
        assert await store.cancel(running.id, "alice") == CancelOutcome.ALREADY_DONE
        assert await store.cancel("no-such-id", "alice") == CancelOutcome.NOT_FOUND

    async def test_a_lost_worker_is_requeued_once_then_failed(self, store, clock):
        j, later = job(cap=1), job(cap=1)
        await store.enqueue(j, L, cap_pending=False)
        await store.claim("r1", LEASE)
        await store.enqueue(later, L, cap_pending=False)
        clock.advance(LEASE - 1)
        assert await store.heartbeat(j.id, "r1", LEASE)
        clock.advance(LEASE + 1)  # r1 died: no heartbeat for longer than the lease
        assert await store.reap() == 1
        requeued = await store.get(j.id, "alice")
        assert requeued.status == JobStatus.QUEUED and requeued.queue_position == 0  # ahead of newer work
        assert "Worker lost" in requeued.logs[-1].message
        again = await store.claim("r2", LEASE)
        assert again.id == j.id and again.attempts == 2
        assert not await store.finish(j.id, "r1", result=RESULT)  # the dead runner's late answer is refused
        clock.advance(LEASE + 1)
        await store.reap()
        lost = await store.get(j.id, "alice")
        assert lost.status == JobStatus.FAILED and lost.error.kind == "worker_lost"
        assert (await store.claim("r3", LEASE)).id == later.id  # the slot was freed

    async def test_results_expire_after_the_ttl(self, store, clock):
        j = job()
        await store.enqueue(j, L, cap_pending=False)
        await store.claim("r1", LEASE)
        await store.finish(j.id, "r1", result=RESULT)
        clock.advance(TTL - 1)
        assert await store.get(j.id, "alice") is not None
        clock.advance(2)
        await store.reap()
        assert await store.get(j.id, "alice") is None
        assert await store.cancel(j.id, "alice") == CancelOutcome.NOT_FOUND

    async def test_a_lapsed_lease_cannot_be_renewed_over_the_cap(self, store, clock):
        limits = Limits(rate_per_minute=100, max_concurrent=1)
        late = await store.admit("alice", limits, lease_s=10)
        clock.advance(10.5)  # the holder missed its renewal: the slot is free
        assert not await store.renew("alice", late.slot, 10)
        assert (await store.admit("alice", limits, LEASE)).allowed  # and stays the only one in flight
        assert (await store.admit("alice", limits, LEASE)).reason == "concurrency"

    # -- a lapsed lease reap has not acted on (a store outage: the runner could not renew) ------------

    async def test_a_lapsed_lease_not_yet_reaped_can_still_finish(self, store, clock):
        j = job()
        await store.enqueue(j, L, cap_pending=False)
        await store.claim("r1", LEASE)
        clock.advance(LEASE + 20)  # the store was down 20 s: no heartbeat got through
        assert await store.finish(j.id, "r1", result=RESULT)  # the answer is kept, not generated again
        done = await store.get(j.id, "alice")
        assert done.status == JobStatus.SUCCEEDED and done.result == RESULT and done.attempts == 1
        assert await store.reap() == 0
        assert await store.claim("r2", LEASE) is None

    async def test_a_lapsed_lease_that_was_reaped_is_lost(self, store, clock):
        j = job()
        await store.enqueue(j, L, cap_pending=False)
        await store.claim("r1", LEASE)
        clock.advance(LEASE + 20)
        assert await store.reap() == 1  # the reaper got there first: the job is back in the queue
        assert await store.heartbeat(j.id, "r1", LEASE) is False
        assert await store.finish(j.id, "r1", result=RESULT) is False
        queued = await store.get(j.id, "alice")
        assert queued.status == JobStatus.QUEUED and queued.result is None and queued.queue_position == 0
        assert (await store.claim("r2", LEASE)).id == j.id

    async def test_a_late_heartbeat_keeps_the_job_and_takes_its_slot_again(self, store, clock):
        capped = Limits(rate_per_minute=100, max_concurrent=1)
        j = job(cap=1)
        await store.enqueue(j, L, cap_pending=False)
        await store.claim("r1", LEASE)
        clock.advance(LEASE + 0.5)
        assert (await store.admit("alice", capped, LEASE)).allowed  # the lapsed lease freed the slot
        assert await store.heartbeat(j.id, "r1", LEASE)  # the job ran all along: it counts again
        assert (await store.admit("alice", capped, LEASE)).reason == "concurrency"
        clock.advance(LEASE - 1)
        assert await store.reap() == 0  # renewed: nothing to recover
        assert (await store.get(j.id, "alice")).status == JobStatus.RUNNING
        assert await store.finish(j.id, "r1", result=RESULT)

    # -- resume: leases stand still while the store is unreachable (docs/faults.md) -------------------

    async def test_leases_stand_still_while_a_replica_could_not_reach_the_store(self, store, clock):
        replica = JobStore(store._backend, clock, away_after_s=5.0)  # as build_store makes it
        capped = Limits(rate_per_minute=100, max_concurrent=2)
        j = job(cap=2)
        await replica.enqueue(j, L, cap_pending=False)
        await replica.claim("r1", LEASE)
        sync = await replica.admit("alice", capped, LEASE)
        clock.advance(LEASE + 20)  # nothing answered for longer than every lease: the store was away
        assert await replica.reap() == 0  # its first call says so first: no lease ran out meanwhile
        assert (await replica.get(j.id, "alice")).status == JobStatus.RUNNING
        assert (await replica.admit("alice", capped, LEASE)).reason == "concurrency"  # both slots still held
        assert await replica.renew("alice", sync.slot, LEASE)
        assert await replica.finish(j.id, "r1", result=RESULT)  # the work went on: its answer is kept
        assert await replica.claim("r2", LEASE) is None

    async def test_after_the_store_is_back_leases_run_again(self, store, clock):
        replica = JobStore(store._backend, clock, away_after_s=5.0)
        j = job()
        await replica.enqueue(j, L, cap_pending=False)
        await replica.claim("r1", LEASE)
        clock.advance(20)
        await replica.reap()  # back after 20 s: the lease has all of its time again
        for _ in range(int(LEASE) - 1):  # then the runner is gone: calls go on each second, no heartbeat
            clock.advance(1)
            assert await replica.reap() == 0
        clock.advance(2)
        assert await replica.reap() == 1  # its lease ran out, counted from the store's return
        assert (await replica.get(j.id, "alice")).status == JobStatus.QUEUED

    async def test_an_outage_every_replica_reports_counts_once(self, store, clock):
        j = job()
        await store.enqueue(j, L, cap_pending=False)
        await store.claim("r1", LEASE)
        since = clock.now
        clock.advance(20)
        await store._backend.resume(since, clock.now)
        clock.advance(0.5)
        await store._backend.resume(since, clock.now)  # another replica that lived through the same outage
        clock.advance(LEASE - 1)
        assert await store.reap() == 0
        clock.advance(1)  # 20.5 s moved, not 40.5
        assert await store.reap() == 1

    async def test_a_replica_that_was_not_away_moves_no_lease(self, store, clock):
        j = job()
        await store.enqueue(j, L, cap_pending=False)
        await store.claim("r1", LEASE)  # by a replica that then died
        clock.advance(LEASE + 5)
        fresh = JobStore(store._backend, clock, away_after_s=5.0)  # its replacement: nothing to report
        assert await fresh.reap() == 1
        assert (await store.get(j.id, "alice")).status == JobStatus.QUEUED

    async def test_a_lease_only_grows(self, store, clock):
        capped = Limits(rate_per_minute=100, max_concurrent=1)
        j = job(cap=1)
        await store.enqueue(j, L, cap_pending=False)
        await store.claim("r1", LEASE)
        sync = await store.admit("bob", capped, LEASE)
        late = JobStore(store._backend, lambda: clock.now - LEASE / 2)  # sent earlier, run now (a frozen store)
        assert await late.heartbeat(j.id, "r1", LEASE)
        assert await late.renew("bob", sync.slot, LEASE)
        clock.advance(LEASE - 1)
        assert await store.reap() == 0  # still the lease the claim gave
        assert (await store.admit("bob", capped, LEASE)).reason == "concurrency"
        assert (await store.admit("alice", capped, LEASE)).reason == "concurrency"

    # -- requeue: the engine failed under a running job ----------------------------------------------

    async def test_requeue_puts_the_job_back_at_the_front_then_ends_it_with_the_error(self, store, clock):
        j, later = job(cap=1, notify=True), job(cap=1)
        await store.enqueue(j, L, cap_pending=False)
        await store.claim("r1", LEASE)
        await store.enqueue(later, L, cap_pending=False)
        clock.advance(1)
        assert await store.requeue(j.id, "r1", ENGINE_LOST)
        requeued = await store.get(j.id, "alice")
        assert requeued.status == JobStatus.QUEUED and requeued.queue_position == 0  # ahead of newer work
        assert requeued.runner is None and requeued.lease_until is None and requeued.error is None
        assert requeued.logs[-1].message == REQUEUED and requeued.logs[-1].timestamp == clock.now
        assert await store.take_finished(LEASE) == []  # not ended
        assert await store.requeue(j.id, "r1", ENGINE_LOST) is False  # handed back once
        assert await store.finish(j.id, "r1", result=RESULT) is False
        again = await store.claim("r2", LEASE)
        assert again.id == j.id and again.attempts == 2 and again.input == j.input
        assert await store.requeue(j.id, "r1", ENGINE_LOST) is False  # not r1's any more
        clock.advance(1)
        assert await store.requeue(j.id, "r2", ENGINE_LOST)  # its last attempt: ended with the error
        failed = await store.get(j.id, "alice")
        assert failed.status == JobStatus.FAILED and failed.error == ENGINE_LOST and failed.result is None
        assert failed.finished_at == clock.now and failed.expires_at == clock.now + TTL
        assert failed.queue_position is None and failed.runner is None
        assert [t.id for t in await store.take_finished(LEASE)] == [j.id]  # announced as any end
        assert (await store.claim("r3", LEASE)).id == later.id  # the slot was freed
        assert await store.requeue(j.id, "r2", ENGINE_LOST) is False  # ended

    async def test_requeue_of_a_job_asked_to_cancel_cancels_it(self, store):
        j = job(notify=True)
        await store.enqueue(j, L, cap_pending=False)
        await store.claim("r1", LEASE)
        assert await store.cancel(j.id, "alice") == CancelOutcome.REQUESTED
        assert await store.requeue(j.id, "r1", ENGINE_LOST)
        cancelled = await store.get(j.id, "alice")
        assert cancelled.status == JobStatus.CANCELLED and cancelled.error.kind == "cancelled"
        assert [t.id for t in await store.take_finished(LEASE)] == [j.id]
        assert await store.counts() == {"queued": 0, "running": 0}

    async def test_a_job_asked_to_cancel_that_finishes_first_ends_cancelled(self, store):
        # Its owner was answered 202 / 200 (docs/api.md §2.5.5, §3.4): its runner hears of it at the next
        # heartbeat, which a short job ends before; its result must not pass for the outcome asked for.
        done, failed = job(notify=True), job()
        for j in (done, failed):
            await store.enqueue(j, L, cap_pending=False)
            await store.claim("r1", LEASE)
            assert await store.cancel(j.id, "alice") == CancelOutcome.REQUESTED
        assert await store.finish(done.id, "r1", result=RESULT)
        assert await store.finish(failed.id, "r1", error=ENGINE_LOST)
        for j in (done, failed):
            ended = await store.get(j.id, "alice")
            assert ended.status == JobStatus.CANCELLED and ended.error.kind == "cancelled" and ended.result is None
        assert [t.id for t in await store.take_finished(LEASE)] == [done.id]  # announced, as any end
        assert await store.counts() == {"queued": 0, "running": 0}

    async def test_requeue_changes_nothing_unless_the_job_runs_on_that_runner(self, store, clock):
        queued, other, ended, reaped = job(), job(), job(), job()
        for j in (ended, other, reaped, queued):
            await store.enqueue(j, L, cap_pending=False)
        for _ in range(3):
            await store.claim("r1", LEASE)  # ended, other, reaped
        assert await store.finish(ended.id, "r1", result=RESULT)
        clock.advance(LEASE - 1)
        assert await store.heartbeat(other.id, "r1", LEASE)
        clock.advance(2)
        assert await store.reap() == 1  # `reaped` is back in the queue, ahead of `queued`
        cases = [(queued.id, "r1"), (other.id, "r2"), (ended.id, "r1"), (reaped.id, "r1"), ("no-such-id", "r1")]
        before = [await store.get(j.id, "alice") for j in (queued, other, ended, reaped)]
        for job_id, runner in cases:
            assert await store.requeue(job_id, runner, ENGINE_LOST) is False, job_id
        assert [await store.get(j.id, "alice") for j in (queued, other, ended, reaped)] == before
        assert await store.counts() == {"queued": 2, "running": 1}

    async def test_requeue_of_a_lapsed_lease_not_yet_reaped_is_what_reap_would_do(self, store, clock):
        j = job()
        await store.enqueue(j, L, cap_pending=False)
        await store.claim("r1", LEASE)
        clock.advance(LEASE + 5)
        assert await store.requeue(j.id, "r1", ENGINE_LOST)
        assert (await store.get(j.id, "alice")).status == JobStatus.QUEUED
        assert await store.reap() == 0  # nothing left for reap

    async def test_requeue_wakes_waiting_runners(self, store):
        capped = Limits(rate_per_minute=100, max_concurrent=1)
        running, waiting = job(cap=1), job(cap=1)
        await store.enqueue(running, capped, cap_pending=False)
        await store.claim("r1", LEASE)
        await store.enqueue(waiting, capped, cap_pending=False)  # waits for alice's slot
        seen = await store.wait_for_work(-1, 5.0)
        assert await store.claim("r2", LEASE) is None
        waiter = asyncio.create_task(store.wait_for_work(seen, 10.0))
        await asyncio.sleep(0.1)
        assert await store.requeue(running.id, "r1", ENGINE_LOST)
        assert await asyncio.wait_for(waiter, 5.0) != seen
        assert (await store.claim("r2", LEASE)).id == running.id  # at the front, in the freed slot

    async def test_lost_jobs_go_back_in_accept_order_ahead_of_newer_work(self, store, clock):
        lost = [job(), job(), job()]
        for j in lost:
            await store.enqueue(j, L, cap_pending=False)
        for _ in lost:
            await store.claim("r1", LEASE)
        newer = job()
        await store.enqueue(newer, L, cap_pending=False)
        clock.advance(LEASE + 1)
        assert await store.reap() == 3
        order = [(await store.claim("r2", LEASE)).id for _ in range(4)]
        assert order == [j.id for j in lost] + [newer.id]

    # -- start deadlines (X-Fal-Request-Timeout) ----------------------------------------------------

    async def test_reap_fails_a_queued_job_past_its_start_deadline(self, store, clock):
        blocker, waiting, later = job(cap=1), job(cap=1, start_timeout_s=10.0), job(cap=1)
        for j in (blocker, waiting, later):
            await store.enqueue(j, L, cap_pending=False)
        assert (await store.get(waiting.id, "alice")).start_timeout_s == 10.0
        await store.claim("r1", LEASE)  # alice is at her cap: `waiting` stays queued
        assert (await store.get(later.id, "alice")).queue_position == 1
        clock.advance(9.999)
        assert await store.reap() == 0
        clock.advance(0.001)  # exactly the deadline: no longer startable
        assert await store.reap() == 1
        failed = await store.get(waiting.id, "alice")
        assert failed.status == JobStatus.FAILED and failed.error.kind == "start_timeout"
        assert failed.started_at is None and failed.attempts == 0 and failed.queue_position is None
        assert failed.finished_at == clock.now and failed.expires_at == clock.now + TTL
        assert (await store.get(later.id, "alice")).queue_position == 0  # the rest move up
        assert await store.cancel(waiting.id, "alice") == CancelOutcome.ALREADY_DONE
        clock.advance(TTL + 1)
        await store.reap()
        assert await store.get(waiting.id, "alice") is None  # forgotten like any other result

    async def test_claim_fails_an_overdue_job_and_claims_the_next(self, store, clock):
        overdue, fresh = job(start_timeout_s=5.0), job(start_timeout_s=100.0)
        await store.enqueue(overdue, L, cap_pending=False)
        await store.enqueue(fresh, L, cap_pending=False)
        clock.advance(5)
        assert (await store.claim("r1", LEASE)).id == fresh.id
        failed = await store.get(overdue.id, "alice")
        assert failed.status == JobStatus.FAILED and failed.error.kind == "start_timeout"
        assert await store.claim("r1", LEASE) is None
        assert await store.reap() == 0  # already failed: reap has nothing left to do

    async def test_a_job_started_in_time_is_unaffected(self, store, clock):
        j = job(start_timeout_s=5.0)
        await store.enqueue(j, L, cap_pending=False)
        clock.advance(4)
        assert (await store.claim("r1", LEASE)).id == j.id
        clock.advance(10)
        assert await store.reap() == 0
        assert await store.finish(j.id, "r1", result=RESULT)
        assert (await store.get(j.id, "alice")).status == JobStatus.SUCCEEDED

    async def test_a_requeued_job_has_started_and_does_not_time_out(self, store, clock):
        j = job(start_timeout_s=5.0)
        await store.enqueue(j, L, cap_pending=False)
        assert (await store.claim("r1", LEASE)).id == j.id
        clock.advance(LEASE + 1)  # r1 died: the job goes back to the queue, long past its start deadline
        assert await store.reap() == 1
        assert (await store.get(j.id, "alice")).status == JobStatus.QUEUED
        assert await store.reap() == 0
        again = await store.claim("r2", LEASE)
        assert again.id == j.id and again.attempts == 2

    async def test_no_start_timeout_waits_forever(self, store, clock):
        blocker, waiting = job(cap=1), job(cap=1)
        await store.enqueue(blocker, L, cap_pending=False)
        await store.enqueue(waiting, L, cap_pending=False)
        await store.claim("r1", LEASE)
        for _ in range(3):
            clock.advance(LEASE - 1)
            assert await store.heartbeat(blocker.id, "r1", LEASE)
        assert await store.reap() == 0
        assert (await store.get(waiting.id, "alice")).status == JobStatus.QUEUED
        assert await store.finish(blocker.id, "r1", result=RESULT)
        assert (await store.claim("r2", LEASE)).id == waiting.id

    # -- the completion outbox (webhooks) -------------------------------------------------------------

    async def test_every_end_of_a_notify_job_is_handed_out_once_in_order(self, store, clock):
        ran, cancelled, lost, late = job(notify=True), job(notify=True), job(notify=True), job(notify=True,
                                                                                                 start_timeout_s=50.0)
        quiet = job()  # no notify: never announced
        for j in (ran, quiet, lost):
            await store.enqueue(j, L, cap_pending=False)
        assert [(await store.claim("r1", LEASE)).id for _ in range(3)] == [ran.id, quiet.id, lost.id]
        await store.enqueue(cancelled, L, cap_pending=False)
        await store.enqueue(late, L, cap_pending=False)

        clock.advance(1)
        assert await store.finish(ran.id, "r1", result=RESULT)
        assert await store.finish(quiet.id, "r1", result=RESULT)
        clock.advance(1)
        assert await store.cancel(cancelled.id, "alice") == CancelOutcome.CANCELLED
        clock.advance(LEASE)  # r1 died holding `lost`: re-queued, then lost again at its last attempt
        assert await store.reap() == 1
        assert (await store.claim("r2", LEASE)).id == lost.id  # `late` stays queued behind it
        clock.advance(LEASE + 1)
        await store.reap()  # fails `lost` (worker lost), then `late` (past its start deadline)

        taken = await store.take_finished(LEASE, limit=10)
        assert [j.id for j in taken] == [ran.id, cancelled.id, lost.id, late.id]  # the order they ended
        assert [(j.status, j.error and j.error.kind) for j in taken] == [
            (JobStatus.SUCCEEDED, None), (JobStatus.CANCELLED, "cancelled"),
            (JobStatus.FAILED, "worker_lost"), (JobStatus.FAILED, "start_timeout")]
        assert taken[0].result.text == "ab" and all(j.notify and j.queue_position is None for j in taken)
        assert taken[0] == await store.get(ran.id, "alice")  # the terminal record, as `get` returns it
        assert await store.take_finished(LEASE) == []  # each is handed out once

    async def test_take_finished_honours_the_limit_and_claims_expiry_notifies_too(self, store, clock):
        overdue = [job(notify=True, start_timeout_s=5.0) for _ in range(3)]
        for j in overdue:
            await store.enqueue(j, L, cap_pending=False)
        clock.advance(5)
        assert await store.claim("r1", LEASE) is None  # claim fails them all: the queue is empty
        first = await store.take_finished(LEASE, limit=2)
        assert [j.id for j in first] == [j.id for j in overdue[:2]]  # queue order
        assert [j.id for j in await store.take_finished(LEASE, limit=2)] == [overdue[2].id]
        assert await store.take_finished(LEASE, limit=2) == []

    async def test_a_forgotten_job_is_skipped(self, store, clock):
        forgotten, kept = job(notify=True), job(notify=True)
        await store.enqueue(forgotten, L, cap_pending=False)
        await store.cancel(forgotten.id, "alice")
        clock.advance(TTL + 1)
        await store.reap()  # forgets it before anyone took it
        await store.enqueue(kept, L, cap_pending=False)
        await store.cancel(kept.id, "alice")
        assert [j.id for j in await store.take_finished(LEASE)] == [kept.id]

    async def test_renotify_offers_an_ended_job_again_and_nothing_else(self, store, clock):
        ended, waiting = job(notify=True), job()
        for j in (ended, waiting):
            await store.enqueue(j, L, cap_pending=False)
        await store.cancel(ended.id, "alice")
        assert [j.id for j in await store.take_finished(LEASE)] == [ended.id]
        await store.renotify(ended.id)  # its delivery was cut short: offered once more
        await store.renotify(waiting.id)  # not ended: nothing to announce
        await store.renotify("no-such-job")
        again = await store.take_finished(LEASE)
        assert [j.id for j in again] == [ended.id] and again[0].status == JobStatus.CANCELLED
        assert await store.take_finished(LEASE) == []
        await store.renotify(ended.id)  # its lease goes with it: offered once, not again when that runs out
        await store.take_finished(LEASE)
        await store.notified(ended.id)
        clock.advance(LEASE + 1)
        await store.reap()
        assert await store.take_finished(LEASE) == []

    async def test_a_delivery_not_over_within_its_lease_is_offered_again_first(self, store, clock):
        first, second, third = job(notify=True), job(notify=True), job(notify=True)
        for j in (first, second, third):
            await store.enqueue(j, L, cap_pending=False)
            await store.cancel(j.id, "alice")
        assert [j.id for j in await store.take_finished(10.0, limit=2)] == [first.id, second.id]
        await store.notified(second.id)  # delivered (or given up): over
        clock.advance(9.9)
        assert await store.reap() == 0
        assert [j.id for j in await store.take_finished(10.0)] == [third.id]
        clock.advance(0.1)
        await store.reap()  # the first one's deliverer died: its lease ran out
        again = await store.take_finished(10.0)
        assert [(j.id, j.status) for j in again] == [(first.id, JobStatus.CANCELLED)]
        await store.notified(first.id)
        await store.notified(third.id)
        await store.notified("no-such-job")
        clock.advance(60)
        await store.reap()
        assert await store.take_finished(10.0) == []  # each over: never offered again

    # -- waiting for work -------------------------------------------------------------------------

    async def test_an_idle_wait_ends_at_its_timeout_with_the_counter_unchanged(self, store):
        seen = await store.wait_for_work(-1, 5.0)  # differs from -1: at once
        started = time.monotonic()
        assert await store.wait_for_work(seen, 0.3) == seen
        assert time.monotonic() - started >= 0.25

    async def test_a_queued_job_wakes_a_waiting_runner_at_once(self, store):
        seen = await store.wait_for_work(-1, 5.0)
        waiter = asyncio.create_task(store.wait_for_work(seen, 10.0))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        started = time.monotonic()
        await store.enqueue(job(), L, cap_pending=False)
        assert await asyncio.wait_for(waiter, 5.0) != seen
        assert time.monotonic() - started < 1.0

    async def test_a_freed_slot_moves_the_counter_only_while_jobs_wait(self, store):
        capped = Limits(rate_per_minute=100, max_concurrent=1)
        held = await store.admit("alice", capped, LEASE)
        seen = await store.wait_for_work(-1, 5.0)
        await store.release("alice", held.slot)  # nothing queued: nothing to wake anyone for
        assert await store.wait_for_work(seen, 0.1) == seen
        held = await store.admit("alice", capped, LEASE)
        await store.enqueue(job(cap=1), capped, cap_pending=False)  # waits for alice's slot
        seen = await store.wait_for_work(-1, 5.0)
        assert await store.claim("r1", LEASE) is None
        waiter = asyncio.create_task(store.wait_for_work(seen, 10.0))
        await asyncio.sleep(0.1)
        await store.release("alice", held.slot)
        assert await asyncio.wait_for(waiter, 5.0) != seen
        assert await store.claim("r1", LEASE) is not None
