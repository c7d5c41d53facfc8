"""fal sync run under per-key limits (docs/api.md §4.2): 429 shapes and headers, no quota for refusals."""

import asyncio
import threading

import httpx
import uvicorn

from serve.ingress import create_app
from tests.conftest import data_uri, free_port
from tests.fakes import FakeEngine, SlowEngine, make_services

URL = "/fal-ai/llavav15-13b"


def app_for(engine, tmp_path, rate, concurrent, backend=None):
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"- {{key: limited-key-1, name: limited, rate_per_minute: {rate}, max_concurrent: {concurrent}}}\n")
    return create_app(make_services(engine, keys, backend))


BODY = {"prompt": "hi", "image_url": data_uri(), "max_new_tokens": 4}
AUTH = {"Authorization": "Key limited-key-1"}


def test_rate_limit_429_with_headers_and_no_quota_for_refusals(tmp_path):
    from fastapi.testclient import TestClient

    client = TestClient(app_for(FakeEngine(), tmp_path, rate=3, concurrent=10))
    ok = [client.post(URL, json=BODY, headers=AUTH) for _ in range(3)]
    assert [r.status_code for r in ok] == [200, 200, 200]
    assert [r.headers["x-ratelimit-remaining"] for r in ok] == ["2", "1", "0"]
    assert ok[0].headers["ratelimit-policy"] == '"default";q=3;w=60'
    assert client.post(URL, json={"prompt": "no image"}, headers=AUTH).status_code == 422  # parsed before limits
    refused = client.post(URL, json=BODY, headers=AUTH)
    assert refused.status_code == 429
    assert refused.json()["detail"].startswith("Rate limit exceeded (3 requests per minute)")
    h = refused.headers
    assert 55 <= int(h["retry-after"]) <= 60 and h["x-ratelimit-limit"] == "3" and h["x-ratelimit-remaining"] == "0"
    assert 55 <= int(h["x-ratelimit-reset"]) <= 60  # delta seconds, not a timestamp
    assert h["ratelimit"] == f'"default";r=0;t={h["x-ratelimit-reset"]}'
    assert h["x-fal-request-id"]


def test_concurrency_limit_429_and_release(tmp_path):
    """Real HTTP server, real concurrency: a third simultaneous request is refused, and the slots
    come back when the first two finish."""
    engine = SlowEngine(delay=0.05)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app_for(engine, tmp_path, rate=100, concurrent=2), port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                while not server.started:
                    await asyncio.sleep(0.02)
                slow = {**BODY, "max_new_tokens": 20}  # ~1 s each
                first = [asyncio.create_task(c.post(URL, json=slow, headers=AUTH)) for _ in range(2)]
                await asyncio.sleep(0.3)
                third = await c.post(URL, json=BODY, headers=AUTH)
                done = await asyncio.gather(*first)
                after = await c.post(URL, json=BODY, headers=AUTH)
                return third, done, after

        third, done, after = asyncio.run(burst())
        assert third.status_code == 429
        assert third.json() == {"detail": "Concurrency limit exceeded. Please retry later."}
        assert int(third.headers["retry-after"]) >= 1
        assert [r.status_code for r in done] == [200, 200]
        assert after.status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_failed_request_gives_its_slot_back(tmp_path):
    from fastapi.testclient import TestClient

    store_app = app_for(FakeEngine(fail_with=RuntimeError("boom")), tmp_path, rate=100, concurrent=1)
    client = TestClient(store_app)
    assert client.post(URL, json=BODY, headers=AUTH).status_code == 500  # an engine bug: slot released anyway
    assert client.post(URL, json=BODY, headers=AUTH).status_code == 500  # not 429: the slot came back


def test_an_unreachable_store_is_a_503_not_a_500(tmp_path):
    from fastapi.testclient import TestClient

    from serve.jobs.memory import MemoryStore
    from serve.jobs.models import StoreUnavailable

    class DownBackend(MemoryStore):
        async def admit(self, *args):
            raise StoreUnavailable("connection refused")

    app = app_for(FakeEngine(), tmp_path, rate=100, concurrent=10, backend=DownBackend(3600.0, 2))
    resp = TestClient(app).post(URL, json=BODY, headers=AUTH)
    assert resp.status_code == 503 and resp.json()["error_type"] == "runner_scheduling_failure"
    assert resp.headers["x-fal-request-id"]
