"""fal queue API, streaming, routing and proxy mode, wire level (docs/api.md §1.2, §2.4–2.8, §2.10):
the real app, job runner and store with a fake engine. The real clients are in tests/integration."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from serve.api.eachlabs.serving import EachlabsExecutor
from serve.api.fal.serving import FalExecutor
from serve.api.services import Services
from serve.config import JobsConfig, MediaConfig, WebhooksConfig
from serve.engine.types import Completion, EngineUnavailable, TextDelta
from serve.ingress import create_app
from serve.jobs.runner import JobRunner
from tests.conftest import LOCAL_KEY, Receiver, data_uri
from tests.fakes import FakeEngine, SlowEngine, make_services

APP = "/fal-ai/llavav15-13b"
AUTH = {"Authorization": f"Key {LOCAL_KEY}"}
FAST = JobsConfig(lease_s=3.0, outage_after_s=1.0, runner_retry_s=0.01, reap_interval_s=0.1)


def body(**kw):
    return {"prompt": "Who drew this?", "image_url": data_uri(), "max_new_tokens": 4, **kw}


def client_for(engine=None, *, runner=True, keys=None, **config) -> TestClient:
    """The app on the embedded default config; `config` replaces whole sections (e.g. media=...)."""
    services = make_services(engine or FakeEngine(), keys)
    if config:
        services = Services.build(services.config.model_copy(update=config), services.engine, services.store)
    executors = {"fal": FalExecutor(services), "eachlabs": EachlabsExecutor(services)}
    job_runner = JobRunner(services.store, "runner-1", executors, FAST) if runner else None
    return TestClient(create_app(services, job_runner))


def keys_file(tmp_path, rate=600, concurrent=10):
    path = tmp_path / "keys.yaml"
    path.write_text(f"- {{key: {LOCAL_KEY}, name: dev, rate_per_minute: {rate}, max_concurrent: {concurrent}}}\n"
                    "- {key: other-key-123, name: other}\n")
    return path


def submit(client, headers=AUTH, path=f"/queue{APP}", **kw):
    resp = client.post(path, json=body(**kw), headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait(client, request_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        resp = client.get(f"/queue{APP}/requests/{request_id}/status?logs=1", headers=AUTH)
        if resp.json()["status"] == "COMPLETED" or time.monotonic() > deadline:
            return resp
        time.sleep(0.02)


def sse(resp) -> list[dict]:
    lines = [line for line in resp.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines  # one data line of JSON per event
    return [json.loads(line[len("data: "):]) for line in lines]


# -- routing (docs/api.md §1.2) ------------------------------------------------------------------------


def test_submit_via_queue_prefix_returns_reachable_urls():
    with client_for(runner=False) as client:
        resp = client.post(f"/queue{APP}", json=body(), headers=AUTH)
    assert resp.status_code == 200
    got = resp.json()
    rid = got["request_id"]
    uuid.UUID(rid)
    assert resp.headers["x-fal-request-id"] == rid
    root = f"http://testserver/queue{APP}/requests/{rid}"
    assert got == {"status": "IN_QUEUE", "request_id": rid, "gateway_request_id": rid, "response_url": root,
                   "status_url": f"{root}/status", "cancel_url": f"{root}/cancel", "queue_position": 0,
                   "logs": None, "metrics": {}}
    assert resp.headers["X-RateLimit-Limit"] == "60"


def test_queue_host_means_queue_and_urls_have_no_prefix():
    with client_for(runner=False) as client:
        got = submit(client, headers={**AUTH, "Host": "queue.llava.example"}, path=APP)
    assert got["status_url"] == f"http://queue.llava.example{APP}/requests/{got['request_id']}/status"


def test_configured_queue_base_url_wins():
    from serve.config import FalConfig

    with client_for(runner=False, fal=FalConfig(queue_base_url="https://llava.example.com/q")) as client:
        got = submit(client)
    assert got["response_url"] == f"https://llava.example.com/q{APP}/requests/{got['request_id']}"


def test_the_public_base_url_gives_the_queue_urls_behind_a_tls_proxy():
    """The replicas see http:// behind the cluster's ingress: the URLs fal's client follows (with its key) must
    be the public https ones (docs/api.md §2.5.1)."""
    from serve.config import HttpConfig

    http = HttpConfig(public_base_url="https://llava.example.com/", proxy="haproxy")
    with client_for(runner=False, http=http) as client:
        got = submit(client, headers={**AUTH, "Host": "queue.internal:8000"})
    assert got["status_url"] == f"https://llava.example.com/queue{APP}/requests/{got['request_id']}/status"


def test_same_path_without_queue_marker_runs_synchronously():
    with client_for(runner=False) as client:
        resp = client.post(APP, json=body(), headers=AUTH)
    assert resp.json()["output"] == "w0 w1 w2 w3 " and resp.json()["partial"] is False


@pytest.mark.parametrize("path", ["/queue/fal-ai/unknown-app", "/fal-ai/unknown-app"])
def test_unknown_app_is_fal_404_with_request_id(path):
    with client_for(runner=False) as client:
        resp = client.post(path, json=body(), headers=AUTH)
    assert resp.status_code == 404 and resp.json() == {"detail": "Not Found"}
    uuid.UUID(resp.headers["x-fal-request-id"])


def test_wrong_method_is_405_with_request_id():
    with client_for(runner=False) as client:
        resp = client.delete(APP, headers=AUTH)
    assert resp.status_code == 405 and "x-fal-request-id" in resp.headers


def test_cors_preflight():
    with client_for(runner=False) as client:
        resp = client.options(APP, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "authorization,x-fal-target-url"})
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == "*"
    assert "x-fal-target-url" in resp.headers["access-control-allow-headers"]


def test_cors_preflight_admits_every_header_fals_js_client_sends():
    sent = "authorization,content-type,x-fal-queue-priority,x-fal-runner-hint,x-fal-request-timeout," \
           "x-fal-object-lifecycle-preference"
    with client_for(runner=False) as client:
        resp = client.options(APP, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": sent})
    assert resp.status_code == 200, resp.text  # was 400 "Disallowed CORS headers" while the list said "x-fal-*"



# -- proxy mode (docs/api.md §2.8) ---------------------------------------------------------------------

PROXY = "/api/fal/proxy"


def test_proxy_dispatches_run_submit_and_status_on_the_target_url():
    with client_for() as client:
        run = client.post(PROXY, json=body(), headers={**AUTH, "x-fal-target-url": f"https://fal.run{APP}"})
        assert run.status_code == 200 and run.json()["output"] == "w0 w1 w2 w3 "
        sub = client.post(PROXY, json=body(), headers={**AUTH, "x-fal-target-url": f"https://queue.fal.run{APP}"})
        got = sub.json()
        # The JS client ignores these URLs and rebuilds fal's own; give it fal's.
        assert got["status_url"] == f"https://queue.fal.run{APP}/requests/{got['request_id']}/status"
        wait(client, got["request_id"])
        target = f"https://queue.fal.run{APP}/requests/{got['request_id']}/status?logs=1"
        status = client.get(PROXY, headers={**AUTH, "x-fal-target-url": target})
    assert status.status_code == 200 and status.json()["status"] == "COMPLETED"
    assert isinstance(status.json()["logs"], list)  # the target's query string was honoured
    assert status.headers["x-fal-request-id"] == got["request_id"]


@pytest.mark.parametrize("target", [None, "https://evil.example/fal-ai/llavav15-13b", "http://fal.run/fal-ai/x",
                                    "https://rest.fal.ai/storage/auth/token", "not a url"])
def test_proxy_refuses_missing_or_disallowed_targets_like_fal_server_proxy(target):
    headers = {**AUTH, **({"x-fal-target-url": target} if target else {})}
    with client_for(runner=False) as client:
        resp = client.post(PROXY, json=body(), headers=headers)
    assert resp.status_code == 400 and resp.text == "Invalid request"


def test_proxy_needs_credentials():
    with client_for(runner=False) as client:
        resp = client.post(PROXY, json=body(), headers={"x-fal-target-url": f"https://fal.run{APP}"})
    assert resp.status_code == 401 and resp.json() == {"detail": "Authentication is required"}


# -- status, result, cancel (docs/api.md §2.5) ------------------------------------------------------------


def test_status_in_queue_has_position_and_null_logs_unless_asked():
    with client_for(runner=False) as client:
        first, second = submit(client), submit(client)
        resp = client.get(f"/queue{APP}/requests/{second['request_id']}/status", headers=AUTH)
        assert resp.status_code == 202 and resp.headers["x-fal-request-id"] == second["request_id"]
        assert resp.json()["status"] == "IN_QUEUE" and resp.json()["queue_position"] == 1
        assert resp.json()["logs"] is None
        for flag, is_list in [("true", True), ("True", True), ("1", True), ("false", False), ("0", False)]:
            got = client.get(f"{APP}/requests/{first['request_id']}/status?logs={flag}", headers=AUTH).json()
            assert isinstance(got["logs"], list) is is_list and got["queue_position"] == 0
        result = client.get(f"/queue{APP}/requests/{first['request_id']}", headers=AUTH)
    assert result.status_code == 400 and result.json() == {"detail": "Request is still in progress"}


def test_completed_status_logs_metrics_and_result():
    engine = FakeEngine()
    with client_for(engine) as client:
        rid = submit(client)["request_id"]
        done = wait(client, rid)
        quiet = client.get(f"/queue{APP}/requests/{rid}/status?logs=false", headers=AUTH).json()
        result = client.get(f"/queue{APP}/requests/{rid}", headers=AUTH)
    assert done.status_code == 200
    got = done.json()
    assert got["status"] == "COMPLETED" and "error" not in got and got["metrics"]["inference_time"] >= 0
    messages = [entry["message"] for entry in got["logs"]]
    assert messages == ["Image fetched (64x48)", "Generating", "Generated 4 tokens from 600 input tokens"]
    entry = got["logs"][0]
    assert entry["level"] == "INFO" and entry["source"] == "USER" and entry["timestamp"].endswith("Z")
    assert quiet["logs"] is None
    assert result.status_code == 200 and result.headers["x-fal-request-id"] == rid
    assert [r.request_id for r in engine.requests] == [rid]  # the job's id is the engine's request id
    assert result.json() == {"output": "w0 w1 w2 w3 ", "partial": False,
                             "stats": {"num_input_tokens": 600, "num_output_tokens": 4}}


def test_invalid_input_is_refused_at_submit_as_sync_refuses_it(tmp_path):
    """Checked at submit (docs/api.md §2.5.1): the sync route's 422, no job stored, no quota spent."""
    bad = {"image_url": data_uri(), "temperature": 3}
    with client_for(runner=False, keys=keys_file(tmp_path, rate=1)) as client:
        sync = client.post(APP, json=bad, headers=AUTH)
        queued = client.post(f"/queue{APP}", json=bad, headers=AUTH)
        accepted = client.post(f"/queue{APP}", json=body(), headers=AUTH)  # the key's one request a minute
    assert queued.status_code == sync.status_code == 422
    assert queued.json() == sync.json()
    assert [d["loc"] for d in queued.json()["detail"]] == [["body", "prompt"], ["body", "temperature"]]
    assert accepted.status_code == 200


def test_image_failure_replays_file_download_error():
    with client_for() as client:
        rid = submit(client, image_url="http://127.0.0.1:9/nope.png")["request_id"]
        status = wait(client, rid).json()
        result = client.get(f"/queue{APP}/requests/{rid}", headers=AUTH)
    assert status["error_type"] == "file_download_error"
    assert result.status_code == 422
    (item,) = result.json()["detail"]
    assert item["loc"] == ["body", "image_url"] and item["type"] == "file_download_error"
    assert item["url"] == "https://docs.fal.ai/errors/#file_download_error"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]"])
def test_submit_refuses_an_unreadable_body_as_sync_does(raw):
    headers = {**AUTH, "Content-Type": "application/json"}
    with client_for(runner=False) as client:
        resp = client.post(f"/queue{APP}", content=raw, headers=headers)
        sync = client.post(APP, content=raw, headers=headers)
    assert resp.status_code == 422 and resp.json() == sync.json()


def test_cancel_every_case():
    engine = SlowEngine(delay=0.05)
    with client_for(engine) as client:
        running = submit(client, max_new_tokens=2000)["request_id"]
        deadline = time.monotonic() + 5
        while client.get(f"/queue{APP}/requests/{running}/status", headers=AUTH).json()["status"] != "IN_PROGRESS":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        resp = client.put(f"/queue{APP}/requests/{running}/cancel", headers=AUTH)
        assert (resp.status_code, resp.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
        assert resp.headers["x-fal-request-id"] == running
        done = wait(client, running).json()
        assert done["error_type"] == "request_cancelled" and engine.cancelled == 1
        resp = client.put(f"/queue{APP}/requests/{running}/cancel", headers=AUTH)
        assert (resp.status_code, resp.json()) == (400, {"status": "ALREADY_COMPLETED"})
        resp = client.put(f"/queue{APP}/requests/{uuid.uuid4()}/cancel", headers=AUTH)
        assert (resp.status_code, resp.json()) == (404, {"status": "NOT_FOUND"})
        result = client.get(f"/queue{APP}/requests/{running}", headers=AUTH)
    assert result.status_code == 400
    assert result.json() == {"detail": "Request was cancelled", "error_type": "request_cancelled"}
    assert result.headers["x-fal-error-type"] == "request_cancelled"


def test_cancel_queued_job():
    with client_for(runner=False) as client:
        rid = submit(client)["request_id"]
        resp = client.put(f"/queue{APP}/requests/{rid}/cancel", headers=AUTH)
        status = client.get(f"/queue{APP}/requests/{rid}/status", headers=AUTH)
    assert (resp.status_code, resp.json()) == (200, {"status": "OK"})
    assert status.status_code == 200 and status.json()["status"] == "COMPLETED"
    assert status.json()["error"] == "Request was cancelled" and status.json()["metrics"] == {"inference_time": None}


def test_another_keys_request_does_not_exist(tmp_path):
    with client_for(runner=False, keys=keys_file(tmp_path)) as client:
        rid = submit(client)["request_id"]
        other = {"Authorization": "Key other-key-123"}
        for resp in [client.get(f"/queue{APP}/requests/{rid}/status", headers=other),
                     client.get(f"/queue{APP}/requests/{rid}", headers=other)]:
            assert resp.status_code == 404 and resp.json() == {"detail": "Request not found"}
        assert client.put(f"/queue{APP}/requests/{rid}/cancel", headers=other).status_code == 404
        assert client.get(f"/queue{APP}/requests/{rid}/status").status_code == 401


def test_queue_waits_instead_of_refusing_for_concurrency_but_counts_the_rate(tmp_path):
    with client_for(runner=False, keys=keys_file(tmp_path, rate=3, concurrent=1)) as client:
        positions = [submit(client)["queue_position"] for _ in range(3)]
        refused = client.post(f"/queue{APP}", json=body(), headers=AUTH)
    assert positions == [0, 1, 2]
    assert refused.status_code == 429 and "Rate limit exceeded" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) >= 1 and "x-fal-request-id" in refused.headers


def test_status_polls_are_never_limited(tmp_path):
    with client_for(runner=False, keys=keys_file(tmp_path, rate=1, concurrent=1)) as client:
        rid = submit(client)["request_id"]
        codes = {client.get(f"/queue{APP}/requests/{rid}/status", headers=AUTH).status_code for _ in range(50)}
    assert codes == {202}


# -- start timeout (X-Fal-Request-Timeout) ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["0.5", "abc", "1", "nan"])
def test_bad_start_timeout_is_a_422_on_the_header(value):
    with client_for(runner=False) as client:
        for path in [f"/queue{APP}", APP]:
            resp = client.post(path, json=body(), headers={**AUTH, "X-Fal-Request-Timeout": value})
            assert resp.status_code == 422
            assert resp.json()["detail"][0]["loc"] == ["header", "x-fal-request-timeout"]


def test_an_unreadable_body_is_named_before_a_bad_start_timeout():
    with client_for(runner=False) as client:
        for path in [f"/queue{APP}", APP]:
            resp = client.post(path, content=b"{not json", headers={**AUTH, "X-Fal-Request-Timeout": "0.5"})
            assert resp.status_code == 422
            assert resp.json()["detail"][0]["loc"][0] == "body", (path, resp.json())


def test_queued_job_that_cannot_start_in_time_ends_with_504(tmp_path):
    engine = SlowEngine(delay=0.05)
    with client_for(engine, keys=keys_file(tmp_path, concurrent=1)) as client:
        blocker = submit(client, max_new_tokens=2000)["request_id"]  # holds the key's only slot
        late = client.post(f"/queue{APP}", json=body(), headers={**AUTH, "X-Fal-Request-Timeout": "1.5"})
        status = wait(client, late.json()["request_id"]).json()
        result = client.get(f"/queue{APP}/requests/{late.json()['request_id']}", headers=AUTH)
        client.put(f"/queue{APP}/requests/{blocker}/cancel", headers=AUTH)
    assert status["error_type"] == "request_timeout"
    assert result.status_code == 504
    assert result.json() == {"detail": "Request timed out", "error_type": "request_timeout"}
    assert result.headers["X-Fal-Request-Timeout-Type"] == "user"  # neither client retries it
    assert len(engine.requests) == 1  # it never reached the engine


def test_sync_run_that_cannot_start_in_time_is_504_and_aborted():
    engine = SlowEngine(delay=3.0)  # the first token comes after 3 s
    with client_for(engine, runner=False) as client:
        t0 = time.monotonic()
        resp = client.post(APP, json=body(), headers={**AUTH, "X-Fal-Request-Timeout": "1.5"})
        took = time.monotonic() - t0
    assert resp.status_code == 504 and resp.headers["x-fal-request-timeout-type"] == "user"
    assert resp.json()["error_type"] == "request_timeout"
    assert took < 3.0 and engine.cancelled == 1


# -- streaming (docs/api.md §2.4) ------------------------------------------------------------------------


def test_stream_is_cumulative_and_ends_with_the_complete_output():
    with client_for(runner=False) as client:
        resp = client.post(f"{APP}/stream", json=body(), headers={**AUTH, "Accept": "text/event-stream"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    uuid.UUID(resp.headers["x-fal-request-id"])
    events = sse(resp)
    assert [e["output"] for e in events[:-1]] == ["w0 ", "w0 w1 ", "w0 w1 w2 ", "w0 w1 w2 w3 "]
    assert all(e["partial"] is True for e in events[:-1])
    assert events[-1] == {"output": "w0 w1 w2 w3 ", "partial": False,
                          "stats": {"num_input_tokens": 600, "num_output_tokens": 4}}


@pytest.mark.parametrize("engine, payload, code", [
    (FakeEngine(), {"image_url": data_uri()}, 422),
    (FakeEngine(fail_with=EngineUnavailable("down")), body(), 503),
])
def test_stream_errors_before_the_first_event_are_json(engine, payload, code):
    with client_for(engine, runner=False) as client:
        resp = client.post(f"{APP}/stream", json=payload, headers=AUTH)
    assert resp.status_code == code and resp.headers["content-type"] == "application/json"
    assert "x-fal-request-id" in resp.headers


class BreaksMidStream(FakeEngine):
    async def generate(self, request):
        yield TextDelta(text="half", num_tokens=1)
        raise EngineUnavailable("replica died")
        yield Completion(0, 0, "length")  # pragma: no cover (makes this an async generator of both)


def test_mid_stream_failure_ends_with_an_error_event():
    with client_for(BreaksMidStream(), runner=False) as client:
        resp = client.post(f"{APP}/stream", json=body(), headers=AUTH)
    events = sse(resp)
    assert events[0] == {"output": "half", "partial": True}
    assert events[-1] == {"output": "half", "partial": False,
                          "error": "The model runner is unavailable; try again."}


def test_status_stream_sends_changes_with_new_logs_only_and_ends_completed():
    with client_for(SlowEngine(delay=0.02)) as client:
        rid = submit(client, max_new_tokens=20)["request_id"]
        resp = client.get(f"/queue{APP}/requests/{rid}/status/stream?logs=1", headers=AUTH)
        final = client.get(f"/queue{APP}/requests/{rid}/status?logs=1", headers=AUTH).json()
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse(resp)
    assert events[-1]["status"] == "COMPLETED" and all(e["status"] != "COMPLETED" for e in events[:-1])
    assert [line for e in events for line in e["logs"]] == final["logs"]  # concatenated: every line once


# -- webhook (docs/api.md §2.10) ---------------------------------------------------------------------------


def test_fal_webhook_gets_the_result_or_the_replayed_error():
    rx = Receiver([500, 200])  # the first delivery fails: retried
    try:
        media = MediaConfig(allow_networks=["127.0.0.1/32"])
        with client_for(media=media, webhooks=WebhooksConfig(backoff_s=0.05, timeout_s=2.0)) as client:
            ok = client.post(f"/queue{APP}?fal_webhook={rx.url}", json=body(), headers=AUTH).json()["request_id"]
            bad = submit(client, path=f"/queue{APP}?fal_webhook={rx.url}", image_url="http://127.0.0.1:9/nope.png")
            bad = bad["request_id"]
            deadline = time.monotonic() + 10
            while len(rx.calls) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        rx.close()
    by_id = {call["request_id"]: call for call, _ in rx.calls[1:]}
    assert by_id[ok] == {"request_id": ok, "gateway_request_id": ok, "status": "OK", "error": None,
                         "payload": {"output": "w0 w1 w2 w3 ", "partial": False,
                                     "stats": {"num_input_tokens": 600, "num_output_tokens": 4}}}
    assert by_id[bad]["status"] == "ERROR" and by_id[bad]["error"] == "Invalid status code: 422"
    assert by_id[bad]["payload"]["detail"][0]["loc"] == ["body", "image_url"]


@pytest.mark.parametrize("hook", ["ftp://example.com/x", "not a url", "http://"])
def test_unusable_fal_webhook_is_refused_at_submit(hook):
    with client_for(runner=False) as client:
        resp = client.post(f"/queue{APP}", params={"fal_webhook": hook}, json=body(), headers=AUTH)
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["query", "fal_webhook"]


def test_fal_webhook_for_jobs_ended_before_they_started(tmp_path):
    """Cancelled while queued, or past its start timeout: no runner ran it, the webhook still comes."""
    rx = Receiver([200])
    try:
        media = MediaConfig(allow_networks=["127.0.0.1/32"])
        hooks = WebhooksConfig(backoff_s=0.05, timeout_s=2.0)
        with client_for(SlowEngine(delay=0.05), keys=keys_file(tmp_path, concurrent=1), media=media,
                        webhooks=hooks) as client:
            blocker = submit(client, max_new_tokens=2000)["request_id"]  # holds the key's only slot
            cancelled = submit(client, path=f"/queue{APP}?fal_webhook={rx.url}")["request_id"]
            late = client.post(f"/queue{APP}?fal_webhook={rx.url}", json=body(),
                               headers={**AUTH, "X-Fal-Request-Timeout": "1.5"}).json()["request_id"]
            resp = client.put(f"/queue{APP}/requests/{cancelled}/cancel", headers=AUTH)
            assert (resp.status_code, resp.json()) == (200, {"status": "OK"})
            deadline = time.monotonic() + 10
            while len(rx.calls) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            client.put(f"/queue{APP}/requests/{blocker}/cancel", headers=AUTH)
    finally:
        rx.close()
    by_id = {call["request_id"]: call for call, _ in rx.calls}
    assert set(by_id) == {cancelled, late}  # the blocker asked for no webhook
    assert by_id[cancelled] == {"request_id": cancelled, "gateway_request_id": cancelled, "status": "ERROR",
                                "error": "Invalid status code: 400",
                                "payload": {"detail": "Request was cancelled", "error_type": "request_cancelled"}}
    assert by_id[late]["status"] == "ERROR" and by_id[late]["error"] == "Invalid status code: 504"
    assert by_id[late]["payload"] == {"detail": "Request timed out", "error_type": "request_timeout"}


def test_a_webhook_still_being_retried_when_the_replica_stops_goes_back_to_the_store():
    rx = Receiver([503])  # never acknowledged: the delivery waits to retry when the app stops
    try:
        media = MediaConfig(allow_networks=["127.0.0.1/32"])
        client = client_for(media=media, webhooks=WebhooksConfig(backoff_s=60.0, timeout_s=2.0))
        with client:
            rid = client.post(f"/queue{APP}?fal_webhook={rx.url}", json=body(), headers=AUTH).json()["request_id"]
            deadline = time.monotonic() + 10
            while not rx.calls and time.monotonic() < deadline:
                time.sleep(0.05)
        store = client.app.state.services.store
        again = asyncio.run(store.take_finished(60.0))
    finally:
        rx.close()
    assert len(rx.calls) == 1 and [job.id for job in again] == [rid]  # another runner will deliver it
