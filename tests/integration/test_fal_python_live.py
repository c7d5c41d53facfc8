"""The real Python `fal-client==1.0.3` against the live stack, pointed here by its two URL formats
(docs/api.md §5.1(a)); the environment-only way (TLS) is tests/tls. Plus the wire-level behaviour of
the queue and the stream that only real HTTP shows (disconnects, slots held by streams)."""

from __future__ import annotations

import asyncio
import json
import time

import fal_client
import fal_client.client as fal_module
import pytest
import requests

from serve.engine.tiny_model import IMAGE_SEQ_LENGTH
from serve.jobs.models import Limits
from tests.conftest import LOCAL_KEY, data_uri
from tests.integration.conftest import SOLO_KEY, wait_for_abort

APP = "fal-ai/llavav15-13b"
AUTH = {"Authorization": f"Key {LOCAL_KEY}"}


def args(n=8, **kw):
    return {"prompt": "Who drew this?", "image_url": fal_client.encode_image(_image()), "max_new_tokens": n, **kw}


def _image():
    from PIL import Image

    return Image.new("RGB", (64, 48), (200, 30, 60))


@pytest.fixture
def urls(stack, monkeypatch):
    """fal.run and queue.fal.run point at the stack (module globals, read at call time)."""
    monkeypatch.setattr(fal_module, "RUN_URL_FORMAT", f"{stack}/")
    monkeypatch.setattr(fal_module, "QUEUE_URL_FORMAT", f"{stack}/queue/")
    return stack


@pytest.fixture
def fal(urls):
    return fal_client.SyncClient(key=LOCAL_KEY)


def assert_output(out, n=8):
    assert out["partial"] is False and len(out["output"]) == n  # one character per token, never stops early
    assert out["stats"]["num_output_tokens"] == n and out["stats"]["num_input_tokens"] > IMAGE_SEQ_LENGTH


def test_run(fal):
    assert_output(fal.run(APP, arguments=args()))


def test_stream_is_cumulative_and_ends_complete(fal):
    events = list(fal.stream(APP, arguments=args(12)))
    # A partial event per engine delta (one token, or a few when the reader lags), then the final one.
    assert 3 <= len(events) <= 13 and all(e["partial"] for e in events[:-1])
    outputs = [e["output"] for e in events]
    assert all(b.startswith(a) for a, b in zip(outputs, outputs[1:]))
    assert_output(events[-1], 12)
    assert events[-1]["output"] == events[-2]["output"]


def test_subscribe_without_updates(fal):
    assert_output(fal.subscribe(APP, arguments=args()))


def test_subscribe_with_logs_and_updates(fal):
    updates, enqueued = [], []
    out = fal.subscribe(APP, arguments=args(), with_logs=True, on_enqueue=enqueued.append,
                        on_queue_update=updates.append)
    assert_output(out)
    assert len(enqueued) == 1 and isinstance(updates[-1], fal_client.Completed)
    assert {type(u) for u in updates} <= {fal_client.Queued, fal_client.InProgress, fal_client.Completed}
    messages = [log["message"] for log in updates[-1].logs]
    assert messages[0].startswith("Image fetched (64x48)") and "Generating" in messages
    assert messages[-1].startswith("Generated 8 tokens from ")


def test_submit_status_result_and_handles(fal):
    handle = fal.submit(APP, arguments=args())
    status = handle.status(with_logs=True)
    assert isinstance(status, (fal_client.Queued, fal_client.InProgress, fal_client.Completed))
    assert_output(handle.get())
    done = fal.status(APP, handle.request_id, with_logs=True)
    assert isinstance(done, fal_client.Completed) and done.logs and done.metrics["inference_time"] > 0
    assert fal.status(APP, handle.request_id, with_logs=False).logs is None
    assert fal.result(APP, handle.request_id) == handle.get()


def wait_status(base, request_id, want, key=LOCAL_KEY, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = requests.get(f"{base}/queue/{APP}/requests/{request_id}/status",
                           headers={"Authorization": f"Key {key}"}, timeout=10).json()
        if got["status"] == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_cancel_running_job_then_already_completed(fal, urls, engine_stats):
    before = engine_stats()
    handle = fal.submit(APP, arguments=args(2048))
    wait_status(urls, handle.request_id, "IN_PROGRESS")
    handle.cancel()  # 202: returns None
    done = wait_status(urls, handle.request_id, "COMPLETED")
    assert done["error_type"] == "request_cancelled"
    assert wait_for_abort(engine_stats, before)["aborted"] == before["aborted"] + 1
    with pytest.raises(fal_module.FalClientHTTPError) as exc:
        handle.get()
    assert exc.value.status_code == 400 and exc.value.error_type == "request_cancelled"
    with pytest.raises(fal_module.FalClientHTTPError) as exc:
        fal.cancel(APP, handle.request_id)
    assert exc.value.status_code == 400


def test_validation_errors(fal):
    with pytest.raises(fal_module.FalClientHTTPError) as exc:
        fal.run(APP, arguments={"image_url": data_uri()})
    assert exc.value.status_code == 422 and exc.value.response.json()["detail"][0]["loc"] == ["body", "prompt"]
    with pytest.raises(fal_module.FalClientHTTPError) as exc:  # a queued job replays its failure
        fal.subscribe(APP, arguments=args(image_url="http://127.0.0.1:9/missing.png"))
    assert exc.value.status_code == 422
    assert exc.value.response.json()["detail"][0]["type"] == "file_download_error"


def test_async_client(urls):
    async def main():
        fal = fal_client.AsyncClient(key=LOCAL_KEY)
        ran = await fal.run(APP, arguments=args())
        subscribed = await fal.subscribe(APP, arguments=args(), with_logs=True)
        events = [e async for e in fal.stream(APP, arguments=args(4))]
        handle = await fal.submit(APP, arguments=args())
        got = await handle.get()
        status = await fal.status(APP, handle.request_id, with_logs=True)
        return ran, subscribed, events, got, status

    ran, subscribed, events, got, status = asyncio.run(main())
    assert_output(ran)
    assert_output(subscribed)
    assert_output(events[-1], 4) and len(events) >= 2
    assert_output(got)
    assert isinstance(status, fal_client.Completed) and status.logs


def test_client_timeout_cancels_the_job(fal, urls):
    enqueued = []
    with pytest.raises(fal_module.FalClientTimeoutError):
        # A 2048-token job takes 2 s or more, even on a fast machine; fal_client wants more than 1 s.
        fal.subscribe(APP, arguments=args(2048), client_timeout=1.1, on_enqueue=enqueued.append)
    done = wait_status(urls, enqueued[0], "COMPLETED")
    assert done["error_type"] == "request_cancelled"


def test_start_timeout_of_a_job_that_cannot_start(urls, job_store):
    """The key's one slot is busy: a job with a 2 s start timeout ends with a 504 the client does
    not retry (X-Fal-Request-Timeout-Type: user)."""
    solo = fal_client.SyncClient(key=SOLO_KEY)
    # The slot is held in the deployment's store as a sync request holds it (a generation long enough to
    # hold it would be over in about 2 s on a fast machine).
    held = asyncio.run(job_store.admit("tests-solo", Limits(rate_per_minute=100_000, max_concurrent=1), 60.0))
    assert held.allowed
    try:
        t0 = time.monotonic()
        with pytest.raises(fal_module.FalClientHTTPError) as exc:
            solo.subscribe(APP, arguments=args(), start_timeout=2)
        took = time.monotonic() - t0
    finally:
        asyncio.run(job_store.release("tests-solo", held.slot))
    assert exc.value.status_code == 504 and exc.value.error_type == "request_timeout"
    assert exc.value.response_headers["x-fal-request-timeout-type"] == "user"
    assert 2 <= took < 10
    assert solo.run(APP, arguments=args())["partial"] is False  # the slot is free again


def test_a_stream_holds_its_slot_and_a_dropped_stream_aborts(stack, engine_stats):
    solo = {"Authorization": f"Key {SOLO_KEY}"}
    before = engine_stats()
    body = {"prompt": "Describe", "image_url": data_uri(), "max_new_tokens": 2048}
    with requests.post(f"{stack}/{APP}/stream", json=body, headers=solo, stream=True, timeout=60) as streaming:
        assert streaming.status_code == 200
        lines = streaming.iter_lines()  # kept: dropping the iterator would close the connection
        assert next(lines).startswith(b"data: {")
        refused = requests.post(f"{stack}/{APP}", json={**body, "max_new_tokens": 2}, headers=solo, timeout=60)
        assert refused.status_code == 429 and refused.json()["detail"].startswith("Concurrency limit")
    # Closed after one event: the generation stops, and the slot comes back.
    after = wait_for_abort(engine_stats, before)
    assert after["aborted"] == before["aborted"] + 1
    deadline = time.monotonic() + 10
    while (ok := requests.post(f"{stack}/{APP}", json={**body, "max_new_tokens": 2}, headers=solo,
                               timeout=60)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ok.status_code == 200


def test_status_stream_over_http(urls, fal):
    handle = fal.submit(APP, arguments=args(64))
    resp = requests.get(f"{urls}/queue/{APP}/requests/{handle.request_id}/status/stream?logs=1", headers=AUTH,
                        stream=True, timeout=60)
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in resp.iter_lines() if line]
    assert events[-1]["status"] == "COMPLETED"
    logs = [entry["message"] for e in events for entry in e["logs"]]
    assert logs[0].startswith("Image fetched") and logs[-1].startswith("Generated 64 tokens")
