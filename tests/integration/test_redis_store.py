"""The Redis backend under real concurrency: separate clients (separate connections) interleave their
calls on one redis-server, and every operation must still be one atomic step.

The clock is injected and fixed while a burst runs, so every attempt competes for the same window.
Then random operation sequences run in lockstep on MemoryStore and Redis must get equal answers; what
Redis holds of a job's input; a full Redis (maxmemory); and jobs a replica of the previous version touched.
Every test runs on the session's one event loop, as the service runs on one loop per replica.
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from collections import Counter

import pytest
import pytest_asyncio

from serve.jobs.memory import MemoryStore
from serve.jobs.models import Job, JobError, JobResult, JobStatus, Limits, Problem, StoreUnavailable, input_bytes
from serve.jobs.redis_store import RedisBackend
from serve.jobs.store import STORE_OPERATIONS, JobStore
from tests.conftest import ROOT, Clock, free_port
from tests.store_conformance import RESULT, job, with_image

sys.path.insert(0, str(ROOT / "loadtest"))
import stack as loadtest_stack  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="session")

CLIENTS = 4
LEASE = 30.0


@pytest_asyncio.fixture
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


async def test_an_unreachable_redis_is_store_unavailable():
    backend = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", 3600.0, max_attempts=2)  # nothing listens
    with pytest.raises(StoreUnavailable):
        await JobStore(backend).admit("alice", Limits(rate_per_minute=1, max_concurrent=1), LEASE)
    await backend.aclose()


OPS = ["admit", "renew", "release", "enqueue", "enqueue", "get", "claim", "claim", "heartbeat", "log", "finish",
       "requeue", "cancel", "reap", "take_finished", "notified", "renotify", "counts", "startable", "resume",
       "wait_for_work"]


def random_call(rng: random.Random, now: float, slots: list[tuple[str, str]], jobs: list[str]) -> tuple[str, tuple]:
    """One operation with arguments drawn from a few owners, runners, limits and leases."""
    op, owner, runner = rng.choice(OPS), rng.choice("abc"), rng.choice(["r1", "r2", "r3"])
    limits = Limits(rate_per_minute=rng.randint(1, 6), max_concurrent=rng.randint(1, 3),
                    max_pending=rng.randint(1, 4), max_stored_bytes=rng.choice([60, 2500, 10**6]))
    lease = rng.choice([0.7, 5.0, 30.0])
    job_id = rng.choice(jobs) if jobs and rng.random() < 0.9 else "no-such-id"
    if op == "admit":
        slots.append((owner, uuid.UUID(int=rng.getrandbits(128)).hex))
        return op, (owner, limits, slots[-1][1], lease, now)
    if op in ("renew", "release") and slots:
        owner, slot = rng.choice(slots)
        return op, (owner, slot, lease, now) if op == "renew" else (owner, slot, now)
    if op == "enqueue":
        text = "y" * rng.choice([0, 10, 300, 2000])  # over 256 characters: abridged in reads
        job = Job(id=str(uuid.UUID(int=rng.getrandbits(128))), owner=owner, api="fal",
                  input={"x": rng.random(), "text": text},
                  max_concurrent=rng.randint(1, 3), created_at=0.0, notify=rng.random() < 0.5,
                  start_timeout_s=rng.choice([None, None, 2.5, 40.0]))
        jobs.append(job.id)
        return op, (job, limits, rng.random() < 0.5, now)
    if op == "finish":
        kind = rng.choice(["ok", "cancelled", "image_load", None])
        result = JobResult(chunks=["a"], num_input_tokens=1, num_output_tokens=1, finish_reason="stop")
        problems = [Problem(loc=["body", "x"], msg="m", type="t", input=None, ctx={"n": None})]
        error = JobError(kind=kind, message="m", problems=problems) if kind not in ("ok", None) else None
        return op, (job_id, runner, result if kind == "ok" else None, error, now)
    return {  # renew / release before any admit: a reap instead
        "get": ("get", (job_id, owner, now, rng.random() < 0.5)), "cancel": ("cancel", (job_id, owner, now)),
        "claim": ("claim", (runner, lease, now)), "heartbeat": ("heartbeat", (job_id, runner, lease, now)),
        "log": ("log", (job_id, runner, f"line at {now}", now)),
        "requeue": ("requeue", (job_id, runner, JobError(kind="unavailable", message="engine lost"), now)),
        "take_finished": ("take_finished", (rng.randint(1, 3), lease, now)), "renotify": ("renotify", (job_id, now)),
        "notified": ("notified", (job_id, now)), "resume": ("resume", (now - rng.choice([0.5, 20.0, 45.0]), now)),
        "counts": ("counts", (now,)),
        "startable": ("startable", (now,)),
        # Never equal to -1: answers the work counter at once, which must move alike in both stores.
        "wait_for_work": ("wait_for_work", (-1, 0.0, now)),
    }.get(op, ("reap", (now,)))


@pytest.mark.parametrize("seed", range(5))
async def test_redis_answers_exactly_as_memory_store(redis_url, seed):
    """Random operation sequences, run in lockstep on the reference MemoryStore and on Redis: every
    answer must be equal, floats included (a real-epoch clock with fractions, leases and TTLs lapsing)."""
    assert set(OPS) == set(STORE_OPERATIONS)  # every operation gets drawn
    rng = random.Random(seed)
    memory = MemoryStore(result_ttl_s=100.0, max_attempts=2)
    backend = RedisBackend(redis_url, 100.0, max_attempts=2, prefix=f"test-{uuid.uuid4().hex}")
    now, slots, jobs = 1_700_000_000.123456, [], []
    try:
        for step in range(400):
            now += rng.choice([0.0, 0.0, 0.001, 0.5, 3.3, 10.0, 31.0, 61.7])
            op, args = random_call(rng, now, slots, jobs)
            expected = await getattr(memory, op)(*args)
            if isinstance(expected, Job):
                expected = expected.model_copy(deep=True)  # later operations mutate the store's own
            assert await getattr(backend, op)(*args) == expected, (step, op, args)
    finally:
        await backend.aclose()


@pytest_asyncio.fixture
async def raw(redis_url):
    """(a JobStore, a plain client on its Redis, its key prefix): to look at or change what Redis holds."""
    import redis.asyncio as aioredis

    prefix = f"test-{uuid.uuid4().hex}"
    backend, client = RedisBackend(redis_url, 3600.0, max_attempts=2, prefix=prefix), aioredis.from_url(redis_url)
    yield JobStore(backend, Clock()), client, prefix
    await client.aclose()
    await backend.aclose()


async def test_an_ended_job_keeps_only_its_abridged_input_in_redis(raw):
    store, client, prefix = raw
    big = with_image(job())
    await store.enqueue(big, Limits(rate_per_minute=5, max_concurrent=1), cap_pending=False)
    assert await client.hstrlen(f"{prefix}:job:{big.id}", "body") > 200_000  # kept for the runner, until the end
    assert await client.zscore(f"{prefix}:inputs:alice", big.id) == input_bytes(big.input)
    assert int(await client.get(f"{prefix}:stored:alice")) == input_bytes(big.input)
    await store.claim("r1", LEASE)
    await store.finish(big.id, "r1", result=RESULT)
    assert await client.hstrlen(f"{prefix}:job:{big.id}", "body") < 1000
    assert not await client.hexists(f"{prefix}:job:{big.id}", "abridged")
    assert not await client.exists(f"{prefix}:inputs:alice", f"{prefix}:stored:alice", f"{prefix}:queue:alice",
                                   f"{prefix}:owners")


async def test_a_full_redis_refuses_submits_as_unavailable_and_ending_jobs_makes_room(tmp_path):
    """maxmemory reached (noeviction): an enqueue is StoreUnavailable (503 in every API) and records nothing;
    reads, claims and the ends of jobs still run, and ending jobs frees their inputs for new ones."""
    import redis.asyncio as aioredis

    with loadtest_stack.redis_server(tmp_path) as url:
        client = aioredis.from_url(url)
        used = int((await client.info("memory"))["used_memory"])
        await client.config_set("maxmemory", used + 2 * 2**20)
        await client.config_set("maxmemory-policy", "noeviction")
        backend = RedisBackend(url, 3600.0, max_attempts=2)
        store = JobStore(backend, Clock())
        limits = Limits(rate_per_minute=10**6, max_concurrent=1, max_pending=10**6, max_stored_bytes=10**12)
        try:
            accepted = []
            with pytest.raises(StoreUnavailable, match="OutOfMemoryError"):
                for _ in range(100):  # 100 inputs of 200 kB: 20 MB, ten times the room
                    j = with_image(job(cap=1))
                    admitted = await store.enqueue(j, limits, cap_pending=False)
                    assert admitted.allowed
                    accepted.append(j)
            assert 0 < len(accepted) < 20
            assert await store.counts() == {"queued": len(accepted), "running": 0}  # the refused one left nothing
            assert (await store.get(accepted[0].id, "alice", brief=True)).status == JobStatus.QUEUED
            assert (await store.claim("r1", LEASE)).input == accepted[0].input
            assert await store.finish(accepted[0].id, "r1", result=RESULT)
            for j in accepted[1:]:
                assert await store.cancel(j.id, "alice") == "cancelled"
            assert (await store.enqueue(with_image(job(cap=1)), limits, cap_pending=False)).allowed
        finally:
            await client.aclose()
            await backend.aclose()


async def test_a_redis_that_cannot_take_writes_is_unavailable_not_an_error(tmp_path):
    """A replica after a failover answers READONLY: every operation is StoreUnavailable (503), never a 500."""
    import redis.asyncio as aioredis

    with loadtest_stack.redis_server(tmp_path) as url:
        client = aioredis.from_url(url)
        backend = RedisBackend(url, 3600.0, max_attempts=2)
        store = JobStore(backend, Clock())
        try:
            await client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a primary that is not there
            with pytest.raises(StoreUnavailable, match="read only replica"):
                await store.enqueue(job(), Limits(rate_per_minute=5, max_concurrent=1), cap_pending=False)
            with pytest.raises(StoreUnavailable, match="read only replica"):
                await store.admit("alice", Limits(rate_per_minute=5, max_concurrent=1), LEASE)
        finally:
            await client.execute_command("REPLICAOF", "NO", "ONE")
            await client.aclose()
            await backend.aclose()


async def test_a_redis_with_a_password_serves_the_store_that_has_it_and_refuses_one_without(tmp_path):
    """Production's Redis requires AUTH (k8s/redis.yaml): the store authenticates with the password it was given
    (LLAVA_SERVE_REDIS_PASSWORD, docs/kubernetes.md); a store without it gets StoreUnavailable (503), never a 500."""
    import redis.asyncio as aioredis

    secret = "a-long-random-secret-0123456789"
    with loadtest_stack.redis_server(tmp_path) as url:
        client = aioredis.from_url(url)
        await client.config_set("requirepass", secret)
        await client.aclose()
        with_password = RedisBackend(url, 3600.0, max_attempts=2, password=secret)
        without = RedisBackend(url, 3600.0, max_attempts=2)
        limits = Limits(rate_per_minute=5, max_concurrent=1)
        try:
            assert (await JobStore(with_password, Clock()).enqueue(job(), limits, cap_pending=False)).allowed
            with pytest.raises(StoreUnavailable):
                await JobStore(without, Clock()).enqueue(job(), limits, cap_pending=False)
        finally:
            await with_password.aclose()
            await without.aclose()


async def test_jobs_queued_by_the_previous_version_are_read_abridged_and_claimed_after_a_reap(raw):
    """The previous version (a rolling upgrade shares Redis) queues a job in `queue` alone, with `head` (no
    input) and no `abridged`: reads abridge its body, and reap adopts it into its owner's queue."""
    store, client, prefix = raw
    old = with_image(job())
    await store.enqueue(old, Limits(rate_per_minute=5, max_concurrent=1), cap_pending=False)
    key = f"{prefix}:job:{old.id}"
    await client.hdel(key, "abridged")
    await client.hset(key, "head", "{}")
    await client.delete(f"{prefix}:queue:alice", f"{prefix}:owners", f"{prefix}:inputs:alice",
                        f"{prefix}:stored:alice")
    read = await store.get(old.id, "alice")
    assert read.input["image_url"].endswith("(200022 characters)") and read.queue_position == 0
    assert (await store.get(old.id, "alice", brief=True)).input == read.input
    assert await store.claim("r1", LEASE) is None  # not in alice's queue yet
    await store.reap()
    claimed = await store.claim("r1", LEASE)
    assert claimed.id == old.id and claimed.input == old.input


async def test_a_job_the_previous_version_claimed_is_not_claimed_again(raw):
    store, client, prefix = raw
    first, second = job(cap=2), job(cap=2)
    for j in (first, second):
        await store.enqueue(j, Limits(rate_per_minute=5, max_concurrent=2), cap_pending=False)
    # The previous version's claim: out of `queue` and `queued:<owner>` only.
    await client.zrem(f"{prefix}:queue", first.id)
    await client.srem(f"{prefix}:queued:alice", first.id)
    await client.hset(f"{prefix}:job:{first.id}", mapping={"status": "running", "runner": "old"})
    assert (await store.claim("r1", LEASE)).id == second.id
    assert await store.claim("r1", LEASE) is None
    assert await client.zcard(f"{prefix}:queue:alice") == 0 and not await client.exists(f"{prefix}:owners")


async def test_inputs_of_jobs_the_previous_version_ended_do_not_count(raw):
    store, client, prefix = raw
    big = with_image(job(cap=1))
    limits = Limits(rate_per_minute=5, max_concurrent=1, max_stored_bytes=input_bytes(big.input))
    await store.enqueue(big, limits, cap_pending=False)
    await store.claim("r1", LEASE)
    # The previous version's finish: the status and the slot, never `inputs:<owner>` or `stored:<owner>`.
    await client.hset(f"{prefix}:job:{big.id}", "status", "succeeded")
    await client.zrem(f"{prefix}:slots:alice", big.id)
    await client.zrem(f"{prefix}:running", big.id)
    assert (await store.enqueue(with_image(job(cap=1)), limits, cap_pending=False)).allowed


async def test_a_job_the_previous_version_reaped_is_not_finished_by_its_old_runner(raw):
    """finish and heartbeat accept a lapsed lease while the job still runs on the runner; the previous
    version's reap re-queues it (status and runner, in `queue` alone) and that ends it for the runner."""
    store, client, prefix = raw
    j = job()
    await store.enqueue(j, Limits(rate_per_minute=5, max_concurrent=1), cap_pending=False)
    await store.claim("r1", LEASE)
    # The previous version's reap of the lapsed lease.
    key = f"{prefix}:job:{j.id}"
    await client.zrem(f"{prefix}:slots:alice", j.id)
    await client.zrem(f"{prefix}:running", j.id)
    await client.hset(key, "status", "queued")
    await client.hdel(key, "runner", "lease_until")
    await client.zadd(f"{prefix}:queue", {j.id: -1})
    await client.sadd(f"{prefix}:queued:alice", j.id)
    assert await store.finish(j.id, "r1", result=RESULT) is False
    assert await store.heartbeat(j.id, "r1", LEASE) is False
    assert await store.requeue(j.id, "r1", JobError(kind="unavailable", message="engine lost")) is False
    await store.reap()  # adopted into alice's queue
    again = await store.claim("r2", LEASE)
    assert again.id == j.id and again.attempts == 2


async def test_a_job_requeue_put_back_is_queued_where_the_previous_version_claims(raw):
    """The previous version claims from `queue` and counts `queued:<owner>`: requeue puts the job in both,
    first, as reap does."""
    store, client, prefix = raw
    j, later = job(), job()
    await store.enqueue(j, Limits(rate_per_minute=5, max_concurrent=2), cap_pending=False)
    await store.claim("r1", LEASE)
    await store.enqueue(later, Limits(rate_per_minute=5, max_concurrent=2), cap_pending=False)
    assert await store.requeue(j.id, "r1", JobError(kind="unavailable", message="engine lost"))
    assert [m.decode() for m in await client.zrange(f"{prefix}:queue", 0, -1)] == [j.id, later.id]
    assert await client.sismember(f"{prefix}:queued:alice", j.id)
    assert await client.hget(f"{prefix}:job:{j.id}", "status") == b"queued"
    assert not await client.hexists(f"{prefix}:job:{j.id}", "runner")
    assert await client.zscore(f"{prefix}:running", j.id) is None
    assert await client.zscore(f"{prefix}:slots:alice", j.id) is None


async def test_the_production_config_builds_a_redis_store(redis_url, tmp_path):
    """`store.backend: redis` (as in configs/llava-1.5-13b-l40s.yaml) reaches the same Redis semantics."""
    from serve.config import load_config
    from serve.jobs.factory import build_store
    from tests.conftest import CONFIGS

    cfg = load_config(CONFIGS / "llava-1.5-13b-l40s.yaml", env={})
    cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"redis_url": redis_url}),
                                 "app_name": f"t{tmp_path.name}"})
    store = build_store(cfg)
    limits = Limits(rate_per_minute=1, max_concurrent=5)
    assert [(await store.admit("alice", limits, LEASE)).allowed for _ in range(2)] == [True, False]


async def test_a_waiting_runner_reads_the_whole_backlog_of_announcements(redis_url):
    """Under load every job's end announces work; a waiter that found the counter moved at once must still
    read what was published meanwhile, or the backlog grows until Redis drops the subscriber."""
    backend = RedisBackend(redis_url, 3600.0, max_attempts=2, prefix=f"test-{uuid.uuid4().hex}")
    store = JobStore(backend)
    limits = Limits(rate_per_minute=10_000, max_concurrent=1)
    try:
        seen = await store.wait_for_work(-1, 1.0)  # subscribes
        held = await store.admit("alice", limits, LEASE)
        await store.enqueue(Job(id="queued", owner="alice", api="fal", input={}, max_concurrent=1, created_at=0.0),
                            limits, cap_pending=False)
        for _ in range(200):  # a job waits: each freed slot announces
            await store.release("alice", held.slot)
            held = await store.admit("alice", limits, LEASE)
        current = await store.wait_for_work(seen, 1.0)
        assert current >= seen + 200
        assert await backend._pubsub.get_message(timeout=0) is None  # nothing left unread
        assert await store.wait_for_work(current, 0.2) == current  # and no stale message wakes the next wait
    finally:
        await backend.aclose()


async def test_a_burst_beyond_the_connection_pool_waits_for_a_connection(redis_url):
    """More calls at once in one replica than it has connections (redis-py's default pool refuses the 101st
    with "Too many connections", which would be a 503): they wait their turn, and all are answered."""
    backend = RedisBackend(redis_url, 3600.0, max_attempts=2, prefix=f"test-{uuid.uuid4().hex}")
    store = JobStore(backend)
    try:
        answers = await asyncio.gather(*(store.get(f"job-{i}", "alice") for i in range(500)))
        assert answers == [None] * 500
    finally:
        await backend.aclose()


async def test_an_outage_moves_the_leases_of_its_own_prefix_only(redis_url):
    """`resume` finds slot keys by pattern: a prefix with glob characters must not reach another prefix's keys."""
    base = f"test-{uuid.uuid4().hex}"
    globbed = RedisBackend(redis_url, 3600.0, max_attempts=2, prefix=f"{base}*")
    other = RedisBackend(redis_url, 3600.0, max_attempts=2, prefix=f"{base}-other")  # what `*` would match
    capped, now = Limits(rate_per_minute=100, max_concurrent=1), 1_700_000_000.0
    try:
        assert (await other.admit("alice", capped, "s1", 10.0, now)).allowed
        assert (await globbed.admit("alice", capped, "s2", 10.0, now)).allowed
        await globbed.resume(now, now + 100.0)
        assert (await other.admit("alice", capped, "s3", 10.0, now + 11.0)).allowed  # its lease ran as it was
        assert (await globbed.admit("alice", capped, "s4", 10.0, now + 101.0)).reason == "concurrency"  # moved
    finally:
        await globbed.aclose()
        await other.aclose()
