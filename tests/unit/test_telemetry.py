"""The access line each API request leaves (fields, ids, key names), its JSON form, and /metrics
without Ray. Metric values after real traffic are in tests/integration/test_telemetry_live.py."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest
from fastapi.testclient import TestClient

from serve.ingress import create_app
from serve.telemetry.access import JsonFormatter, TextFormatter
from tests.conftest import LOCAL_KEY, data_uri
from tests.fakes import FakeEngine, make_services

AUTH = {"Authorization": f"Key {LOCAL_KEY}"}


@pytest.fixture
def client():
    return TestClient(create_app(make_services(FakeEngine())))


@pytest.fixture
def logging_polls():
    services = make_services(FakeEngine())
    telemetry = services.config.telemetry.model_copy(update={"log_polls": True})
    services.config = services.config.model_copy(update={"telemetry": telemetry})
    return TestClient(create_app(services))


def lines(caplog) -> list[dict]:
    return [r.fields for r in caplog.records if r.name == "llava_serve.access"]


def test_one_access_line_per_request_with_the_request_id_and_key_name(client, caplog):
    caplog.set_level(logging.INFO, logger="llava_serve.access")
    ok = client.post("/fal-ai/llavav15-13b", json={"prompt": "hi", "image_url": data_uri()}, headers=AUTH)
    denied = client.post("/fal-ai/llavav15-13b", json={"prompt": "hi", "image_url": data_uri()})
    client.get("/healthz")
    client.get("/nowhere")
    first, second, third = lines(caplog)
    assert first["request_id"] == ok.headers["x-fal-request-id"] and first["key"] == "local-dev"
    assert (first["api"], first["route"], first["method"], first["status"]) == ("fal", "run", "POST", 200)
    assert 0 < first["first_byte_ms"] <= first["duration_ms"]
    assert second["status"] == 401 and second["key"] is None
    assert second["request_id"] == denied.headers["x-fal-request-id"]
    assert (third["api"], third["route"], third["status"]) == ("other", "unmatched", 404)  # probes: no line
    assert all(LOCAL_KEY not in json.dumps(line) for line in lines(caplog))


def test_eachlabs_lines_use_the_prediction_id(logging_polls, caplog):
    client = logging_polls
    caplog.set_level(logging.INFO, logger="llava_serve.access")
    each = {"X-API-Key": "local-each-key"}
    created = client.post("/v1/prediction/", headers=each, json={
        "model": "llava-13b", "version": "0.0.1", "input": {"image": data_uri(), "prompt": "hi"}}).json()
    client.get(f"/v1/prediction/{created['predictionID']}", headers=each)
    create, get = lines(caplog)
    assert create["request_id"] == get["request_id"] == created["predictionID"]
    assert (create["route"], get["route"], create["key"]) == ("create", "get", "local-eachlabs")


def test_queue_routes_are_named_by_operation(logging_polls, caplog):
    client = logging_polls
    caplog.set_level(logging.INFO, logger="llava_serve.access")
    sub = client.post("/queue/fal-ai/llavav15-13b", json={"prompt": "hi", "image_url": data_uri()}, headers=AUTH)
    rid = sub.json()["request_id"]
    client.get(f"/queue/fal-ai/llavav15-13b/requests/{rid}/status", headers=AUTH)
    client.put(f"/queue/fal-ai/llavav15-13b/requests/{rid}/cancel", headers=AUTH)
    assert [(line["route"], line["request_id"]) for line in lines(caplog)] == [
        ("submit", rid), ("status", rid), ("cancel", rid)]


def test_polls_are_not_logged_one_by_one_unless_they_fail(client, caplog):
    caplog.set_level(logging.INFO, logger="llava_serve.access")
    sub = client.post("/queue/fal-ai/llavav15-13b", json={"prompt": "hi", "image_url": data_uri()}, headers=AUTH)
    rid = sub.json()["request_id"]
    for _ in range(3):
        assert client.get(f"/queue/fal-ai/llavav15-13b/requests/{rid}/status", headers=AUTH).status_code in (200, 202)
    assert client.get("/queue/fal-ai/llavav15-13b/requests/nope/status", headers=AUTH).status_code == 404
    each = {"X-API-Key": "local-each-key"}
    created = client.post("/v1/prediction/", headers=each, json={
        "model": "llava-13b", "input": {"image": data_uri(), "prompt": "hi"}}).json()
    assert client.get(f"/v1/prediction/{created['predictionID']}", headers=each).status_code == 200
    assert [(line["route"], line["status"]) for line in lines(caplog)] == [
        ("submit", 200), ("status", 404), ("create", 200)]


def test_json_formatter_writes_one_object_per_line():
    record = logging.LogRecord("llava_serve.access", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"request_id": "r1", "status": 200}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    got = json.loads(line)
    assert got["message"] == "request" and got["level"] == "INFO" and got["request_id"] == "r1"
    assert got["ts"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("serve.x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(failed))["exc"]


def test_text_formatter_writes_one_readable_line_per_request(client, caplog):
    """The development console's lines (telemetry.log_format: text): what a person scans for, no key."""
    caplog.set_level(logging.INFO, logger="llava_serve.access")
    client.post("/fal-ai/llavav15-13b", json={"prompt": "hi", "image_url": data_uri()}, headers=AUTH)
    client.post("/fal-ai/llavav15-13b", json={"prompt": "hi", "image_url": data_uri()})
    ok, denied = (TextFormatter().format(r) for r in caplog.records if r.name == "llava_serve.access")
    assert re.fullmatch(r"\d\d:\d\d:\d\d 200 POST /fal-ai/llavav15-13b fal run key=local-dev \d+ ms", ok), ok
    assert re.fullmatch(r"\d\d:\d\d:\d\d 401 POST /fal-ai/llavav15-13b fal run key=- \d+ ms", denied), denied
    # A client's %0a in the path stays on its own line: it cannot forge another.
    caplog.clear()
    client.get("/fal-ai/llavav15-13b/requests/x%0a12:00:00 200 POST forged/status", headers=AUTH)
    (forged,) = (TextFormatter().format(r) for r in caplog.records if r.name == "llava_serve.access")
    assert "\n" not in forged and "x\\n12:00:00" in forged, forged
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("serve.x", logging.ERROR, __file__, 1, "failed %s", ("once",), sys.exc_info())
    failed.fields = {"job": "j1"}
    first, *trace = TextFormatter().format(failed).splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d ERROR serve.x: failed once job=j1", first) and "ValueError: boom" in trace[-1]


def test_metrics_without_ray_is_a_clear_503(client):
    resp = client.get("/metrics")
    assert resp.status_code == 503 and "Ray" in resp.json()["detail"]


def test_an_answer_without_output_tokens_is_counted():
    from serve.telemetry.metrics import metrics

    metrics().generated("fal", "tests", 600, 0)  # Ray's counters raise on an increment of 0: never a 500


@pytest.mark.parametrize("how", ["disconnect", "cancelled"])
def test_a_stream_its_client_leaves_midway_is_recorded_499(caplog, how):
    """Not the 200 the answer began with: the client did not get it whole (docs/operations.md). Serve's proxy
    cancels the request's task; a server that reads the socket delivers http.disconnect."""
    import asyncio

    from serve.api.context import RequestContextMiddleware

    async def stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        if how == "cancelled":
            raise asyncio.CancelledError
        assert (await receive())["type"] == "http.disconnect"

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    scope = {"type": "http", "method": "POST", "path": "/fal-ai/llavav15-13b/stream", "headers": []}
    caplog.set_level(logging.INFO, logger="llava_serve.access")
    try:
        asyncio.run(RequestContextMiddleware(stream)(scope, receive, send))
    except asyncio.CancelledError:
        pass
    (line,) = [r for r in caplog.records if r.name == "llava_serve.access"]
    assert line.fields["status"] == 499
