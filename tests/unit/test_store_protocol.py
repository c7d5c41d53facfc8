"""Every store backend implements `StoreBackend` exactly: the same operations, each a coroutine with the
Protocol's parameters (names, kinds, defaults, annotations) and return annotation. Classes only: no
Ray, no Redis."""

from __future__ import annotations

import inspect

import pytest

from serve.jobs.memory import MemoryStore
from serve.jobs.ray_actor import RayActorBackend
from serve.jobs.redis_store import RedisBackend
from serve.jobs.store import STORE_OPERATIONS, JobStore, StoreBackend

BACKENDS = [MemoryStore, RayActorBackend, RedisBackend]


def public_coroutines(cls: type) -> set[str]:
    return {name for name, member in inspect.getmembers(cls)
            if not name.startswith("_") and inspect.iscoroutinefunction(member)}


def test_the_protocol_lists_every_operation():
    assert STORE_OPERATIONS == ("admit", "renew", "release", "enqueue", "get", "claim", "heartbeat", "log",
                                "finish", "requeue", "cancel", "reap", "take_finished", "notified", "renotify",
                                "counts", "startable", "resume", "wait_for_work")
    assert public_coroutines(StoreBackend) == set(STORE_OPERATIONS)
    # The facade offers each operation under the same name (adding the clock, and slot ids), and closes; it
    # sends `resume` itself, before its first call after an outage.
    assert public_coroutines(JobStore) == {*STORE_OPERATIONS, "aclose"} - {"resume"}


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("op", STORE_OPERATIONS)
def test_each_backend_method_matches_the_protocol(backend, op):
    method, spec = getattr(backend, op, None), getattr(StoreBackend, op)
    assert inspect.iscoroutinefunction(method), f"{backend.__name__}.{op} is missing or not async"
    assert inspect.signature(method) == inspect.signature(spec)
    assert method.__qualname__ == f"{backend.__name__}.{op}"  # its own, not inherited from elsewhere


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda cls: cls.__name__)
def test_no_backend_has_other_operations(backend):
    assert public_coroutines(backend) - {"aclose"} == set(STORE_OPERATIONS)
    assert not hasattr(backend, "call")  # no string-typed dispatch


async def test_the_ray_actor_backend_binds_its_arguments_before_calling_the_actor():
    backend = RayActorBackend.__new__(RayActorBackend)  # no actor: the arguments are checked first
    with pytest.raises(TypeError, match="now"):
        await backend.admit("alice", None, "slot", 30.0)
