"""The embedded store's actor dies (serve/jobs/ray_actor.py): Ray restarts it, empty, and the backend finds it
again by name, so store calls are answered again without restarting the replicas (docs/architecture.md,
"The job store": its contents are lost; production uses Redis).

Needs a Ray cluster, not the whole stack: the integration stack's when this process has one, else a small
private one started here and shut down at the end.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from serve.jobs.models import StoreUnavailable
from serve.jobs.ray_actor import RayActorBackend
from serve.jobs.store import JobStore
from tests.conftest import Clock
from tests.store_conformance import TTL, L, job

pytestmark = pytest.mark.asyncio(loop_scope="session")

NAMESPACE = "llava-serve"  # RayActorBackend's


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    if ray.is_initialized():  # the integration stack's cluster: used, and left running
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def actor_name(ray_cluster):
    import ray

    name = f"test-store-restart-{uuid.uuid4().hex}"
    yield name
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))  # for good (no_restart: the default)
    except ValueError:
        pass  # already gone


async def test_a_killed_store_actor_restarts_empty_and_calls_are_answered(actor_name):
    import ray

    store = JobStore(RayActorBackend(actor_name, TTL, max_attempts=2), Clock())
    assert (await store.enqueue(job(), L, cap_pending=False)).allowed
    assert await store.counts() == {"queued": 1, "running": 0}
    actor = ray.get_actor(actor_name, namespace=NAMESPACE)

    ray.kill(actor, no_restart=False)  # as a crash: Ray restarts it
    # Every call is answered, the ones sent while it restarts included (retried on the new one), and the
    # store comes back fresh: what it held is gone.
    deadline = time.monotonic() + 60
    while (counts := await store.counts()) != {"queued": 0, "running": 0}:
        assert counts == {"queued": 1, "running": 0} and time.monotonic() < deadline, counts
        await asyncio.sleep(0.05)
    assert ray.get_actor(actor_name, namespace=NAMESPACE)._actor_id == actor._actor_id  # restarted, not replaced

    fresh = job()
    assert (await store.enqueue(fresh, L, cap_pending=False)).allowed
    assert (await store.claim("r1", 30.0)).id == fresh.id


async def test_a_store_actor_killed_for_good_is_created_again_by_the_next_call(actor_name):
    import ray
    from ray.exceptions import RayActorError

    store = JobStore(RayActorBackend(actor_name, TTL, max_attempts=2), Clock())
    assert (await store.enqueue(job(), L, cap_pending=False)).allowed
    actor = ray.get_actor(actor_name, namespace=NAMESPACE)

    ray.kill(actor, no_restart=True)  # no restart: its handle stays dead
    deadline = time.monotonic() + 60
    while True:  # until the kill has landed
        try:
            await actor.counts.remote(0.0)
        except RayActorError:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)

    with pytest.raises(StoreUnavailable):  # the call that finds it dead: a 503
        await store.counts()
    assert await store.counts() == {"queued": 0, "running": 0}  # the next one: a new, empty actor by that name
    assert ray.get_actor(actor_name, namespace=NAMESPACE)._actor_id != actor._actor_id
    assert (await store.enqueue(job(), L, cap_pending=False)).allowed
