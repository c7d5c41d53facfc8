"""The store's conformance suite (tests/store_conformance.py) on the reference MemoryStore, in-process.
tests/integration/test_store_conformance.py runs the same suite on the Ray actor and Redis."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.store_conformance")

from serve.jobs.memory import MemoryStore  # noqa: E402
from serve.jobs.store import JobStore  # noqa: E402
from tests.store_conformance import TTL, StoreConformance  # noqa: E402


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def store(self, clock):
        return JobStore(MemoryStore(TTL, max_attempts=2), clock)
