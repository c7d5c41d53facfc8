"""The Redis backend under real concurrency: separate clients (separate connections) interleave their
calls on one redis-server, and every operation must still be one atomic step.

The clock is injected and fixed while a burst runs, so every attempt competes for the same window.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest
import pytest_asyncio

from serve.jobs.models import Job, JobStatus, Limits
from serve.jobs.redis_store import RedisBackend
from serve.jobs.store import JobStore

CLIENTS = 4
LEASE = 30.0


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest_asyncio.fixture(loop_scope="function")  # the tests' loop: the clients' connections live in it
async def stores(redis_url, clock):
    """One JobStore per client, each with its own connection pool, all on the same keys."""
    prefix = f"test-{uuid.uuid4().hex}"
    backends = [RedisBackend(redis_url, 3600.0, max_attempts=2, prefix=prefix) for _ in range(CLIENTS)]
    yield [JobStore(backend, clock) for backend in backends]
    for backend in backends:
        await backend.aclose()


async def burst(stores, make_call, attempts: int) -> list:
    """`attempts` calls at once, spread over the clients."""
    return await asyncio.gather(*(make_call(stores[i % len(stores)]) for i in range(attempts)))


async def test_concurrent_admits_never_exceed_the_rate(stores, clock):
    limits = Limits(rate_per_minute=7, max_concurrent=10_000)
    first = await burst(stores, lambda s: s.admit("alice", limits, LEASE), 200)
    assert sum(a.allowed for a in first) == 7  # exactly the limit: more attempts than it, none lost
    assert {a.reason for a in first if not a.allowed} == {"rate"}
    assert len({a.slot for a in first if a.allowed}) == 7
    assert sorted(a.remaining for a in first if a.allowed) == list(range(7))  # each saw the one before

    clock.now += 30  # the window is still full
    assert not any(a.allowed for a in await burst(stores, lambda s: s.admit("alice", limits, LEASE), 100))
    clock.now += 30.001  # the first burst has left the window: the refusals recorded nothing
    assert sum(a.allowed for a in await burst(stores, lambda s: s.admit("alice", limits, LEASE), 200)) == 7


async def test_concurrent_admits_never_exceed_the_cap(stores):
    limits = Limits(rate_per_minute=10_000, max_concurrent=3)
    results = await burst(stores, lambda s: s.admit("alice", limits, LEASE), 200)
    assert sum(a.allowed for a in results) == 3
    assert {a.reason for a in results if not a.allowed} == {"concurrency"}
    assert sum(a.allowed for a in await burst(stores, lambda s: s.admit("bob", limits, LEASE), 50)) == 3


async def test_concurrent_claims_hand_each_job_to_one_runner_within_the_caps(stores):
    caps = {"alice": 2, "bob": 3, "carol": 5}
    limits = Limits(rate_per_minute=10_000, max_concurrent=1)  # enqueue does not check the cap here
    jobs = [Job(id=str(uuid.uuid4()), owner=owner, api="fal", input={"i": i}, max_concurrent=cap, created_at=0.0)
            for i in range(20) for owner, cap in caps.items()]
    for j in jobs:  # one by one: their queue order is known
        assert (await stores[0].enqueue(j, limits, cap_pending=False)).allowed

    # Runners claim from every client at once while bob's sync requests compete for his slots.
    bob = Limits(rate_per_minute=10_000, max_concurrent=caps["bob"])
    calls = [s.claim(f"runner-{i}", LEASE) for i, s in enumerate(stores * 20)]
    calls += [s.admit("bob", bob, LEASE) for s in stores * 5]
    results = await asyncio.gather(*calls)
    claimed = [c for c in results[: len(stores) * 20] if c is not None]
    admitted = [a for a in results[len(stores) * 20:] if a.allowed]

    assert len({c.id for c in claimed}) == len(claimed)  # no job handed out twice
    per_owner = Counter(c.owner for c in claimed)
    assert per_owner["alice"] == caps["alice"] and per_owner["carol"] == caps["carol"]
    assert per_owner["bob"] + len(admitted) == caps["bob"]  # jobs and sync requests share the cap
    # Each owner's claims are its oldest jobs (FIFO), and the store agrees with what runners were told.
    for owner in caps:
        oldest = [j.id for j in jobs if j.owner == owner][: per_owner[owner]]
        assert sorted(c.id for c in claimed if c.owner == owner) == sorted(oldest)
    for c in claimed:
        stored = await stores[1].get(c.id, c.owner)
        assert stored.status == JobStatus.RUNNING and stored.runner == c.runner and stored.attempts == 1
    assert await stores[2].claim("late", LEASE) is None  # every owner is at its cap
