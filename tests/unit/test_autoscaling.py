"""Autoscaling and scale to zero, in-process (docs/autoscaling.md): the engine policy counts the store's startable
jobs, a resting engine keeps jobs queued and makes sync requests wait a bound, then 503 with Retry-After in each
API's shape. tests/autoscaling/ shows the same on the real stack."""

import asyncio
import json
import time
import types

import pytest

from serve import autoscaling
from serve.api.eachlabs.errors import ANSWERS as EACHLABS
from serve.api.errors import answer
from serve.api.fal.errors import ANSWERS as FAL
from serve.api.openai.errors import ANSWERS as OPENAI
from serve.config import ConfigError, parse_config
from serve.deployment import ENGINE_DEPLOYMENT, ENGINE_POLICY, INGRESS_DEPLOYMENT, deployment_options
from serve.engine.server import HandleEngine
from serve.engine.types import Completion, EngineWaking
from serve.jobs.models import JobStatus, Limits
from serve.jobs.runner import JobRunner
from serve.api.fal.serving import FalExecutor
from tests.conftest import CONFIGS
from tests.fakes import FakeEngine, make_services
from tests.unit.test_handle_engine import FakeHandle, FakeResponse
from tests.unit.test_job_runner import FAST, fal_job, until


def ctx(requests: float, per_replica: float = 16):
    config = types.SimpleNamespace(get_target_ongoing_requests=lambda: per_replica)
    return types.SimpleNamespace(total_num_requests=requests, config=config)


@pytest.mark.parametrize("requests, queued, want", [(0, 0, 0), (1, 0, 1), (16, 0, 1), (17, 0, 2), (4, 40, 3)])
def test_one_replica_per_target_of_requests_and_startable_jobs(requests, queued, want):
    assert autoscaling.desired_replicas(requests, queued, 16) == want


class Backend:
    def __init__(self, startable):
        self.startable_jobs, self.fail = startable, False

    async def startable(self, now):
        if self.fail:
            raise ConnectionError("store away")
        return self.startable_jobs


def test_the_policy_reads_the_store_off_the_loop_and_keeps_the_last_figure_through_an_outage(monkeypatch):
    backend = Backend(40)
    monkeypatch.setattr("serve.jobs.factory.build_backend", lambda *args: backend)
    policy = autoscaling.QueueAwarePolicy(store={"backend": "ray_actor"}, app_name="llava", max_attempts=2,
                                          poll_s=0.05)

    async def main():
        # Serve calls it in its loop, synchronously: the first decision cannot wait for the store.
        first = policy(ctx(4))
        await asyncio.sleep(0.1)
        second = policy(ctx(4))
        backend.fail = True
        await asyncio.sleep(0.1)
        policy(ctx(4))
        await asyncio.sleep(0.1)
        through_outage = policy(ctx(4))
        backend.fail, backend.startable_jobs = False, 0
        await asyncio.sleep(0.1)
        policy(ctx(4))
        await asyncio.sleep(0.1)
        return first, second, through_outage, policy(ctx(4))

    first, second, through_outage, after = asyncio.run(main())
    assert first == (1, {"queued_jobs": 0})
    assert second == (3, {"queued_jobs": 40})
    assert through_outage == (3, {"queued_jobs": 40})  # no scale-down because the store blinked
    assert after == (1, {"queued_jobs": 0})


def local(**changes):
    import yaml

    data = yaml.safe_load((CONFIGS / "local-autoscale.yaml").read_text())
    for path, value in changes.items():
        node = data
        *parents, last = path.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    return parse_config(data, CONFIGS, env={})


def test_the_engine_deployment_scales_with_the_queue_aware_policy_and_the_ingress_with_serves():
    cfg = local(**{"engine_deployment.queue_poll_s": 3})
    opts = deployment_options(cfg)
    policy = opts[ENGINE_DEPLOYMENT]["autoscaling_config"]["policy"]
    assert policy["policy_function"] == ENGINE_POLICY
    module, name = ENGINE_POLICY.split(":")
    assert getattr(__import__(module, fromlist=[name]), name) is autoscaling.QueueAwarePolicy  # as Serve imports it
    assert policy["policy_kwargs"] == {"store": cfg.store.model_dump(mode="json"), "app_name": "llava",
                                       "max_attempts": cfg.jobs.max_attempts, "poll_s": 3}
    json.dumps(policy)  # it travels in the Serve config (KubeRay's serveConfigV2)
    assert "autoscaling_config" not in opts[INGRESS_DEPLOYMENT]


def test_the_ingress_may_not_rest():
    with pytest.raises(ConfigError, match="job runners"):
        local(**{"ingress.autoscaling": {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 64}})


class Controller:
    """What HandleEngine reads of Serve's controller: the engine deployment's status and running replicas."""

    def __init__(self, running: int, status: str = "HEALTHY"):
        self.running, self.status, self.asked = running, status, 0

    def __call__(self):
        self.asked += 1
        return self.status, self.running


def resting_engine(response, controller, wait_s=0.2):
    engine = HandleEngine(FakeHandle(response), cold_start_wait_s=wait_s)
    engine._ask_controller = controller
    return engine


class Never(FakeResponse):
    async def __anext__(self):
        await asyncio.sleep(3600)


def test_a_request_to_a_resting_engine_waits_its_bound_then_is_told_when_to_retry():
    response = Never([])

    async def main():
        return [item async for item in resting_engine(response, Controller(running=0)).generate(None)]

    started = time.monotonic()
    with pytest.raises(EngineWaking) as waking:
        asyncio.run(main())
    assert 0.2 <= time.monotonic() - started < 2
    assert waking.value.retry_after_s == 0.2 and response.cancelled  # the call is withdrawn, not left queued


def test_a_request_to_a_resting_engine_that_starts_in_time_is_served():
    items = [Completion(10, 0, "length")]

    async def main():
        return [item async for item in resting_engine(FakeResponse(items), Controller(running=0)).generate(None)]

    assert asyncio.run(main()) == items


@pytest.mark.parametrize("answers, message", [
    (FAL, lambda body: body["detail"]),
    (EACHLABS, lambda body: body["error"]),
    (OPENAI, lambda body: body["error"]["message"]),
])
def test_the_503_of_a_resting_engine_carries_retry_after_in_each_apis_shape(answers, message):
    err = answer(answers, EngineWaking("starting", retry_after_s=29.5))
    assert err.status_code == 503 and err.headers["Retry-After"] == "30"
    assert "unavailable" in message(err.body)


def test_readiness_of_an_engine_that_may_rest_asks_only_the_controller():
    controller = Controller(running=0)
    engine = resting_engine(FakeResponse([]), controller)
    asyncio.run(engine.check_health())  # at rest and ready: nothing called on a replica (it would wake one)
    controller.status = "DEPLOY_FAILED"
    engine._state = None
    with pytest.raises(Exception, match="DEPLOY_FAILED"):
        asyncio.run(engine.check_health())


def test_runners_claim_nothing_while_the_engine_rests_and_start_once_it_runs():
    awake = asyncio.Event()

    async def main():
        services = make_services(FakeEngine())
        runner = JobRunner(services.store, "runner-1", {"fal": FalExecutor(services)}, FAST,
                           engine_awake=lambda: asyncio.sleep(0, awake.is_set()))
        runner.start()
        try:
            job = fal_job()
            await services.store.enqueue(job, Limits(rate_per_minute=60, max_concurrent=10), cap_pending=False)
            await asyncio.sleep(0.5)
            resting = await services.store.get(job.id, "alice")
            startable = await services.store.startable()
            awake.set()
            return resting, startable, await until(services.store, job, "alice", {JobStatus.SUCCEEDED})
        finally:
            await runner.stop(0)

    resting, startable, done = asyncio.run(main())
    assert resting.status == JobStatus.QUEUED and resting.queue_position == 0  # what its owner reads meanwhile
    assert startable == 1  # what the autoscaling policy counts, and starts a replica for
    assert done.status == JobStatus.SUCCEEDED
