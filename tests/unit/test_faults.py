"""Faults at unit level (docs/faults.md): a job runner and a sync request's slot through store outages and an
engine that dies under a job, with the reference store behind a switch that makes chosen operations fail as an
unreachable store does. The live suite (tests/faults/) injects the same faults with the real mechanisms."""

import asyncio
import logging

import pytest

from serve.api.fal.serving import FalExecutor
from serve.api.limits import admitted
from serve.auth import Caller
from serve.engine.types import EngineUnavailable
from serve.jobs.memory import MemoryStore
from serve.jobs.models import FailureKind, JobResult, JobStatus, Limits, StoreUnavailable
from serve.jobs.runner import ENGINE_LOST, JobRunner
from serve.jobs.store import JobStore
from tests.fakes import FakeEngine, SlowEngine, make_services
from tests.unit.test_job_runner import FAST, fal_job, until

LIMITS = Limits(rate_per_minute=600, max_concurrent=10)


class Switch:
    """The reference store, whose operations named in `down` fail as an unreachable store's do (each for its
    next `times` calls, or until `down` is cleared)."""

    def __init__(self, store):
        self._store, self.down, self.failed, self.all_down = store, {}, [], False

    def __getattr__(self, name):
        op = getattr(self._store, name)

        async def call(*args, **kwargs):
            left = self.down.get(name, 0)
            if left or self.all_down:
                self.down[name] = max(0, left - 1)
                self.failed.append(name)
                raise StoreUnavailable(f"job store unavailable: ConnectionError ({name})")
            return await op(*args, **kwargs)

        return call


def running(engine, body, cfg=FAST):
    async def main():
        switch = Switch(MemoryStore(3600.0, 2))
        services = make_services(engine, backend=switch, away_after_s=cfg.outage_after_s)
        runner = JobRunner(services.store, "runner-1", {"fal": FalExecutor(services)}, cfg)
        runner.start()
        try:
            return await body(services.store, switch)
        finally:
            await runner.stop(0)

    return asyncio.run(main())


def test_a_finished_generation_is_recorded_through_an_outage_never_run_again():
    engine = FakeEngine()

    async def body(store, switch):
        switch.down["finish"] = 5  # the store is away when the outcome is recorded
        job = fal_job()
        await store.enqueue(job, LIMITS, cap_pending=False)
        return await until(store, job, "alice", {JobStatus.SUCCEEDED, JobStatus.FAILED}), switch.failed

    done, failed = running(engine, body)
    assert failed.count("finish") == 5
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 1 and len(engine.requests) == 1


def test_heartbeats_and_log_lines_lost_in_a_blip_cost_the_job_nothing():
    engine = SlowEngine(delay=0.05)  # 20 tokens, 1 s: several heartbeats (every lease/3 = 0.2 s)

    async def body(store, switch):
        switch.down.update(heartbeat=2, log=10)
        job = fal_job(max_new_tokens=20)
        await store.enqueue(job, LIMITS, cap_pending=False)
        return await until(store, job, "alice", {JobStatus.SUCCEEDED, JobStatus.FAILED}), switch.failed

    done, failed = running(engine, body, FAST.model_copy(update={"lease_s": 0.6}))
    assert "heartbeat" in failed and "log" in failed
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 1 and engine.cancelled == 0


def test_work_goes_on_through_an_outage_longer_than_its_lease_and_is_recorded_once():
    """Nobody can renew a lease while the store is away, so leases stand still meanwhile: the work goes on,
    its outcome is recorded when the store answers, and no reap takes the job from its runner."""
    engine = SlowEngine(delay=0.05)
    cfg = FAST.model_copy(update={"lease_s": 0.6, "outage_after_s": 0.3})

    async def body(store, switch):
        job = fal_job(max_new_tokens=40)  # 2 s of work
        await store.enqueue(job, LIMITS, cap_pending=False)
        await until(store, job, "alice", {JobStatus.RUNNING})
        switch.all_down = True  # for longer than the lease (0.6 s): every call fails
        await asyncio.sleep(1.5)
        switch.all_down = False
        return await until(store, job, "alice", {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

    done = running(engine, body, cfg)
    assert engine.cancelled == 0 and len(engine.requests) == 1
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 1


def test_a_runner_cut_off_while_its_job_was_taken_stops_the_work():
    """Only this runner could not reach the store (the others reaped its job): the first heartbeat that gets
    through says the job is no longer its own, and the work stops."""
    engine = SlowEngine(delay=0.05)
    cfg = FAST.model_copy(update={"lease_s": 0.6, "outage_after_s": 0.3})

    async def body(store, switch):
        job = fal_job(max_new_tokens=60)  # 3 s of work
        await store.enqueue(job, LIMITS, cap_pending=False)
        await until(store, job, "alice", {JobStatus.RUNNING})
        switch.down["heartbeat"] = 10**6
        await asyncio.sleep(1.0)  # the lease runs out; reaps go on (another replica's, in effect)
        switch.down["heartbeat"] = 0
        return await until(store, job, "alice", {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

    done = running(engine, body, cfg)
    assert engine.cancelled == 1 and len(engine.requests) == 2  # the first run stopped, the job ran again
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 2


class Dies(FakeEngine):
    """An engine replica that dies under the first `deaths` requests, as a killed one does mid-generation."""

    def __init__(self, deaths: int):
        super().__init__()
        self.deaths = deaths

    async def generate(self, request):
        if self.deaths:
            self.deaths -= 1
            self.requests.append(request)
            raise EngineUnavailable("no engine replica could serve the request: ActorDiedError")
        async for item in super().generate(request):
            yield item


@pytest.mark.parametrize("deaths, status", [(1, JobStatus.SUCCEEDED), (2, JobStatus.FAILED)])
def test_a_job_whose_engine_dies_is_run_again_once_then_fails_clearly(deaths, status):
    engine = Dies(deaths)

    async def body(store, switch):
        job = fal_job()
        await store.enqueue(job, LIMITS, cap_pending=False)
        return await until(store, job, "alice", {JobStatus.SUCCEEDED, JobStatus.FAILED})

    done = running(engine, body)
    assert done.status == status and done.attempts == 2 and len(engine.requests) == 2
    if status == JobStatus.FAILED:
        assert (done.error.kind, done.error.message) == (FailureKind.UNAVAILABLE, ENGINE_LOST)


def test_a_store_outage_is_logged_once_when_it_begins_and_once_when_it_ends(caplog):
    async def body(store, switch):
        switch.down["claim"] = 40  # about 40 retries (runner_retry_s 0.01)
        while switch.down["claim"]:
            await asyncio.sleep(0.01)
        job = fal_job()
        await store.enqueue(job, LIMITS, cap_pending=False)
        return await until(store, job, "alice", {JobStatus.SUCCEEDED})

    with caplog.at_level(logging.INFO, logger="serve.jobs.runner"):
        assert running(FakeEngine(), body).status == JobStatus.SUCCEEDED
    lines = [r.getMessage() for r in caplog.records if r.name == "serve.jobs.runner" and "store" in r.getMessage()]
    assert len(lines) == 2 and "unavailable" in lines[0] and "available again" in lines[1], lines
    assert not any(r.exc_info for r in caplog.records if r.name == "serve.jobs.runner")


# -- webhook deliveries -----------------------------------------------------------------------------------


class Announcing:
    """An executor whose webhook deliveries never end (its replica died mid-delivery) when `started`, and that has
    nothing to deliver otherwise; it records each end it is handed."""

    def __init__(self, started: bool):
        self.started, self.handed = started, []

    async def run(self, job, log):
        return JobResult(chunks=["x"], num_input_tokens=1, num_output_tokens=1, finish_reason="stop")

    def finished(self, job) -> bool:
        self.handed.append(job.id)
        return self.started


@pytest.mark.parametrize("started", [True, False])
def test_a_delivery_that_never_ends_is_handed_out_again_each_lease_and_nothing_else_is(started):
    cfg = FAST.model_copy(update={"notify_lease_s": 0.3})

    async def main():
        store = JobStore(MemoryStore(3600.0, 2))
        executor = Announcing(started)
        runner = JobRunner(store, "runner-1", {"fal": executor}, cfg)
        runner.start()
        try:
            job = fal_job().model_copy(update={"notify": True})
            await store.enqueue(job, LIMITS, cap_pending=False)
            await until(store, job, "alice", {JobStatus.SUCCEEDED})
            await asyncio.sleep(1.2)  # four leases
            return executor.handed
        finally:
            await runner.stop(0)

    handed = asyncio.run(main())
    if started:  # at least once: offered again after each lease that ran out (reaps every 0.1 s)
        assert 3 <= len(handed) <= 5, handed
    else:
        assert len(handed) == 1  # nothing to deliver: never offered again


# -- a sync request's concurrency slot -------------------------------------------------------------------


def admitting(body, renew_failures: int, lease_s: float):
    async def main():
        switch = Switch(MemoryStore(3600.0, 2))
        store = JobStore(switch)
        caller = Caller(name="alice", limits=Limits(rate_per_minute=600, max_concurrent=1))
        switch.down["renew"] = renew_failures
        async with admitted(store, caller, lease_s):
            return await body(store, caller)

    return asyncio.run(main())


def test_a_sync_requests_slot_survives_a_blip():
    async def body(store, caller):
        await asyncio.sleep(1.0)  # renewals every 0.1 s: the first three fail, the next succeed
        return "done"

    assert admitting(body, renew_failures=3, lease_s=0.3) == "done"


def test_a_sync_request_goes_on_through_an_outage_longer_than_its_lease():
    async def body(store, caller):
        await asyncio.sleep(1.0)  # every renewal fails for more than three leases
        return "done"

    assert admitting(body, renew_failures=10**6, lease_s=0.3) == "done"


def test_a_sync_requests_renewer_survives_an_unexpected_failure():
    async def main():
        backend = MemoryStore(3600.0, 2)
        calls = []
        real_renew = backend.renew

        async def flaky(*args):
            calls.append(args)
            if len(calls) == 1:
                raise RuntimeError("a bug, not an outage")
            return await real_renew(*args)

        backend.renew = flaky
        store = JobStore(backend)
        caller = Caller(name="alice", limits=Limits(rate_per_minute=600, max_concurrent=1))
        async with admitted(store, caller, 0.3):
            await asyncio.sleep(1.0)  # renewals every 0.1 s: the first fails, the rest go on
            return len(calls), await store.admit("alice", caller.limits, 0.3)

    renewals, second = asyncio.run(main())
    assert renewals >= 3 and second.reason == "concurrency"  # the slot held all along
