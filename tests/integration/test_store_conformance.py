"""The store's conformance suite (tests/store_conformance.py) on the shared backends.

ray_actor: the named actor in the live test cluster; redis: a real redis-server started by the
fixture. tests/unit/test_memory_store.py runs the same suite on the reference MemoryStore.
"""

from __future__ import annotations

import uuid

import pytest
import pytest_asyncio

pytest.register_assert_rewrite("tests.store_conformance")

from serve.jobs.ray_actor import RayActorBackend  # noqa: E402
from serve.jobs.redis_store import RedisBackend  # noqa: E402
from serve.jobs.store import JobStore  # noqa: E402
from tests.store_conformance import TTL, StoreConformance  # noqa: E402


class TestSharedBackends(StoreConformance):
    @pytest_asyncio.fixture(params=["ray_actor", "redis"])
    async def store(self, request, clock):
        if request.param == "redis":
            url = request.getfixturevalue("redis_url")  # one server; each test gets its own key prefix
            backend = RedisBackend(url, TTL, max_attempts=2, prefix=f"test-{uuid.uuid4().hex}")
            yield JobStore(backend, clock)
            await backend.aclose()
        else:
            import ray

            request.getfixturevalue("stack")  # the live test cluster
            name = f"test-store-{uuid.uuid4().hex}"
            yield JobStore(RayActorBackend(name, TTL, max_attempts=2), clock)
            ray.kill(ray.get_actor(name, namespace="llava-serve"))
