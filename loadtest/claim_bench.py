"""What a claim costs behind one capped key's backlog in the Redis job store (docs/bounds.md, "The job store").

One key ("backlog", max_concurrent 1, one job running) has N jobs pending, none claimable; for each N
(default 1,000, 5,000 and 20,000, filled in turn) this measures, over --repeat calls each:

- an idle claim: nothing is claimable (what every runner does each time the store announces work);
- another key's claim: a second key enqueues one job behind the whole backlog, and a runner claims it;
- a status poll: a brief read of the backlog's last job.

Last, a status poll (brief read) and a full read of a queued job whose input is a 20 MiB data: URI.

Times are the client's (median and p95 milliseconds per call, the round trip included) and, for idle
claims, Redis' own (microseconds per EVALSHA from INFO commandstats). It starts its own redis-server
(needs `redis-server` on PATH) unless given --redis-url. --store-module runs another version of
`serve/jobs/redis_store.py` (e.g. `git show HEAD:serve/jobs/redis_store.py > /tmp/old_store.py`), so one
machine compares the two.

    .venv/bin/python loadtest/claim_bench.py
    .venv/bin/python loadtest/claim_bench.py --store-module /tmp/old_store.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

from serve.jobs.models import Job, Limits  # noqa: E402

LEASE_S = 3600.0  # the running job keeps its slot for the whole run
# Room for any backlog: the bounds under test here are the claim's cost, not the pending cap.
LIMITS = Limits(rate_per_minute=10**9, max_concurrent=1, max_pending=10**9, max_stored_bytes=10**12)
INPUT = {"prompt": "What is shown in this image?", "image_url": "https://example.com/cat.jpg"}


def load_backend(module_path: str | None) -> type:
    if module_path is None:
        from serve.jobs.redis_store import RedisBackend

        return RedisBackend
    spec = importlib.util.spec_from_file_location("claim_bench_store", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RedisBackend


def new_job(owner: str) -> Job:
    return Job(id=str(uuid.uuid4()), owner=owner, api="fal", input=INPUT, max_concurrent=1, created_at=0.0)


async def fill(backend, owner: str, count: int, now: float) -> Job | None:
    """`count` more jobs of `owner`, 50 at a time (within any client's connection pool); the last one."""
    last = None
    for start in range(0, count, 50):
        jobs = [new_job(owner) for _ in range(min(50, count - start))]
        answers = await asyncio.gather(*(backend.enqueue(j, LIMITS, False, now) for j in jobs))
        assert all(a.allowed for a in answers), answers[0]
        last = jobs[-1]
    return last


async def timed(call, repeat: int) -> list[float]:
    """Milliseconds per call."""
    spent = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        spent.append((time.perf_counter() - started) * 1000)
    return spent


def summary(ms: list[float]) -> str:
    """Median and p95 (nearest rank: never below the median, however few the calls)."""
    return f"{statistics.median(ms):8.2f} {sorted(ms)[math.ceil(0.95 * len(ms)) - 1]:8.2f}"


async def run(url: str, backend_cls: type, sizes: list[int], repeat: int) -> dict[int, dict[str, float]]:
    import redis.asyncio as aioredis

    backend = backend_cls(url, 3600.0, max_attempts=2, prefix=f"claim-bench-{uuid.uuid4().hex}")
    client = aioredis.from_url(url, decode_responses=True)
    now, results, pending = 1_700_000_000.0, {}, 0
    try:
        await fill(backend, "backlog", 1, now)
        running = await backend.claim("runner-0", LEASE_S, now)
        assert running is not None and running.owner == "backlog"  # the key is at its cap from here on
        last = None
        print(f"{'pending':>8} {'idle claim ms p50 p95':>22} {'Redis us':>9} {'other key ms p50 p95':>21} "
              f"{'status ms p50 p95':>18}")
        for size in sizes:
            last = await fill(backend, "backlog", size - pending, now) or last
            pending = size

            async def idle_claim() -> None:
                assert await backend.claim("runner-1", LEASE_S, now) is None

            await idle_claim()  # the script loaded
            await client.config_resetstat()
            idle = await timed(idle_claim, repeat)
            stats = await client.info("commandstats")
            redis_us = float(stats["cmdstat_evalsha"]["usec_per_call"])

            other_ms = []
            for _ in range(repeat):
                await backend.enqueue(new_job("other"), LIMITS, False, now)
                started = time.perf_counter()
                claimed = await backend.claim("runner-2", LEASE_S, now)
                other_ms.append((time.perf_counter() - started) * 1000)
                assert claimed is not None and claimed.owner == "other"
                await backend.finish(claimed.id, "runner-2", None, None, now)

            async def poll() -> None:
                assert (await backend.get(last.id, "backlog", now, True)).queue_position is not None

            status = await timed(poll, repeat)
            print(f"{size:>8} {summary(idle):>22} {redis_us:>9.0f} {summary(other_ms):>21} {summary(status):>18}")
            results[size] = {"idle_claim_ms": statistics.median(idle), "redis_us": redis_us,
                             "other_claim_ms": statistics.median(other_ms), "status_ms": statistics.median(status)}
        big = new_job("big").model_copy(update={"input": {**INPUT, "image_url": "data:image/png;base64,"
                                                          + "A" * 20 * 2**20}})
        await backend.enqueue(big, LIMITS, False, now)
        brief = await timed(lambda: backend.get(big.id, "big", now, True), max(1, repeat // 10))
        full = await timed(lambda: backend.get(big.id, "big", now, False), max(1, repeat // 10))
        print(f"20 MiB input, queued: status poll ms p50 p95 {summary(brief)}; full read ms p50 p95 {summary(full)}")
    finally:
        await client.aclose()
        await backend.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="an existing Redis (a fresh key prefix is used); default: start one")
    parser.add_argument("--store-module", help="a redis_store.py to measure instead of serve/jobs/redis_store.py")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="backlogs, ascending")
    parser.add_argument("--repeat", type=int, default=50, help="calls timed per measurement")
    args = parser.parse_args()
    backend_cls = load_backend(args.store_module)
    print(f"store: {args.store_module or 'serve/jobs/redis_store.py'}")
    with contextlib.ExitStack() as resources:
        if args.redis_url:
            url = args.redis_url
        else:
            import stack as loadtest_stack

            url = resources.enter_context(loadtest_stack.redis_server(Path(resources.enter_context(
                tempfile.TemporaryDirectory()))))
        results = asyncio.run(run(url, backend_cls, sorted(args.sizes), args.repeat))
    print(" ".join(f"idle_claim_ms_{n}={r['idle_claim_ms']:.2f} other_claim_ms_{n}={r['other_claim_ms']:.2f}"
                   for n, r in results.items()))


if __name__ == "__main__":
    main()
