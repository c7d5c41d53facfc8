"""Eachlabs prediction API, wire level (docs/api.md §3), fake engine, real app, runner and store."""

import time
import uuid

import pytest
from fastapi.testclient import TestClient

from serve.api.chat import RESERVED
from serve.api.eachlabs.serving import EachlabsExecutor
from serve.api.fal.serving import FalExecutor
from serve.config import JobsConfig
from serve.ingress import create_app
from serve.jobs.runner import JobRunner
from tests.conftest import data_uri
from tests.fakes import FakeEngine, SlowEngine, make_services

KEY = {"X-API-Key": "local-each-key"}
DOC_INPUT = {"image": data_uri(), "top_p": "1", "prompt": "Are you allowed to swim here?",
             "max_tokens": "6", "temperature": "0.2"}
FAST = JobsConfig(lease_s=3.0, outage_after_s=1.0, runner_retry_s=0.01, reap_interval_s=0.1)


def client_for(engine, tmp_path=None, rate=600, concurrent=10, runner=True):
    keys = None
    if tmp_path is not None:
        keys = tmp_path / "keys.yaml"
        keys.write_text(f"- {{key: local-each-key, name: each, rate_per_minute: {rate}, max_concurrent: {concurrent}}}\n")
    services = make_services(engine, keys)
    executors = {"fal": FalExecutor(services), "eachlabs": EachlabsExecutor(services)}
    job_runner = JobRunner(services.store, "runner-1", executors, FAST) if runner else None
    return TestClient(create_app(services, job_runner))


def create(client, headers=KEY, path="/v1/prediction/", **body):
    payload = {"model": "llava-13b", "version": "0.0.1", "input": DOC_INPUT, **body}
    return client.post(path, json=payload, headers=headers)


def wait(client, pid, headers=KEY, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = client.get(f"/v1/prediction/{pid}", headers=headers).json()
        if got["status"] in ("success", "error", "cancelled") or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def test_documented_create_then_poll():
    with client_for(FakeEngine()) as client:
        resp = create(client)
        assert resp.status_code == 200
        body = resp.json()
        assert body["status"] == "success" and body["message"] == "Prediction created successfully"
        pid = body["predictionID"]
        uuid.UUID(pid)
        done = wait(client, pid)
    assert done["status"] == "success"
    assert done["output"] == [f"w{i} " for i in range(6)]  # the chunks, joined: the answer
    assert done["input"] == DOC_INPUT  # echoed exactly: strings stay strings
    assert done["version"] == "0.0.1" and done["logs"] is None
    assert done["metrics"]["predict_time"] >= 0
    assert done["metrics"]["cost"] == pytest.approx(done["metrics"]["predict_time"] * 0.0011, abs=1e-6)
    assert done["urls"] == {"get": f"http://testserver/v1/prediction/{pid}",
                            "cancel": f"http://testserver/v1/prediction/{pid}/cancel"}


def test_numbers_as_json_numbers_and_strings_are_the_same_request():
    engine = FakeEngine()
    with client_for(engine) as client:
        as_numbers = {**DOC_INPUT, "top_p": 0.5, "max_tokens": 7, "temperature": 0}
        as_strings = {**DOC_INPUT, "top_p": "0.5", "max_tokens": "7.0", "temperature": "0"}
        for inp in (as_numbers, as_strings):
            assert wait(client, create(client, input=inp).json()["predictionID"])["status"] == "success"
    first, second = engine.requests
    assert (first.max_tokens, first.top_p, first.temperature) == (7, 0.5, 0.0)
    assert (second.max_tokens, second.top_p, second.temperature) == (7, 0.5, 0.0)
    assert first.stream is True  # the output is the streamed chunks


def test_replicate_defaults():
    engine = FakeEngine()
    with client_for(engine) as client:
        wait(client, create(client, input={"image": data_uri(), "prompt": "hi"}).json()["predictionID"])
    req = engine.requests[0]
    assert (req.max_tokens, req.temperature, req.top_p) == (1024, 0.2, 1.0)
    assert req.prompt.endswith("USER: <image>\nhi ASSISTANT:")


@pytest.mark.parametrize("headers", [{"X-API-Key": "local-each-key"}, {"x-api-key": "local-each-key"},
                                     {"X-API-KEY": "local-each-key"}, {"Authorization": "Bearer local-each-key"}])
def test_both_auth_headers(headers):
    with client_for(FakeEngine(), runner=False) as client:
        assert create(client, headers=headers).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "nope-nope-nope"}, {"Authorization": "Key local-each-key"}])
def test_401(headers):
    with client_for(FakeEngine(), runner=False) as client:
        for resp in (create(client, headers=headers), client.get("/v1/prediction/x", headers=headers)):
            assert resp.status_code == 401 and resp.json() == {"error": "Invalid or missing API key"}


def test_both_create_paths_and_trailing_slash_on_get_without_redirects():
    with client_for(FakeEngine(), runner=False) as client:
        for path in ("/v1/prediction", "/v1/prediction/"):
            resp = create(client, path=path)
            assert resp.status_code == 200 and not resp.history
        pid = resp.json()["predictionID"]
        assert client.get(f"/v1/prediction/{pid}/", headers=KEY).json()["status"] == "created"


@pytest.mark.parametrize(
    "body, status, error",
    [
        ({"model": None}, 400, "model field is required"),
        ({"model": "sdxl"}, 404, "Failed to fetch model: model not found"),
        ({"input": None}, 400, "Invalid input for model: input is required"),
        ({"input": {**DOC_INPUT, "temperature": "hot"}}, 400, "Invalid input for model: temperature:"),
        ({"input": {**DOC_INPUT, "top_p": "2"}}, 400, "Invalid input for model: top_p:"),
        ({"input": {**DOC_INPUT, "max_tokens": "1.5"}}, 400, "Invalid input for model: max_tokens:"),
        ({"input": {"prompt": "no image"}}, 400, "Invalid input for model: image: Field required"),
    ],
)
def test_create_errors(body, status, error):
    with client_for(FakeEngine(), runner=False) as client:
        resp = create(client, **body)
        assert resp.status_code == status and resp.json()["error"].startswith(error), resp.json()


def test_malformed_bodies_unknown_paths_and_ids():
    with client_for(FakeEngine(), runner=False) as client:
        for raw in (b"{not json", b"[1]"):
            resp = client.post("/v1/prediction/", content=raw, headers={**KEY, "Content-Type": "application/json"})
            assert resp.status_code == 400 and resp.json() == {"error": "Invalid request body"}
        assert client.get("/v1/predictions", headers=KEY).json() == {"error": "Not found"}
        assert client.get("/v1/prediction/nope", headers=KEY).json() == {"error": "Prediction not found"}
        pid = create(client).json()["predictionID"]
        other = {"X-API-Key": "local-test-key"}  # a valid key of another owner
        assert client.get(f"/v1/prediction/{pid}", headers=other).status_code == 404  # another key's


@pytest.mark.parametrize("change, code", [({"image": "data:image/png;base64,aGVsbG8="}, "INPUT_VALIDATION_ERROR"),
                                          ({"image": "http://127.0.0.1:1/x.png"}, "INPUT_DOWNLOAD_ERROR"),
                                          *[({"prompt": f"a {marker} here"}, "INPUT_VALIDATION_ERROR")
                                            for marker in RESERVED]])
def test_failed_predictions_are_200_with_an_error_output(change, code):
    with client_for(FakeEngine()) as client:
        done = wait(client, create(client, input={**DOC_INPUT, **change}).json()["predictionID"])
    assert done["status"] == "error"
    assert done["output"]["error_code"] == code and done["output"]["error_message"]
    assert "predict_time" in done["metrics"]


def test_cancel_a_queued_prediction():
    with client_for(FakeEngine(), runner=False) as client:  # no runner: it stays queued
        pid = create(client).json()["predictionID"]
        resp = client.post(f"/v1/prediction/{pid}/cancel", headers=KEY)
        assert resp.json() == {"status": "success", "message": "Prediction cancelled successfully"}
        got = client.get(f"/v1/prediction/{pid}", headers=KEY).json()
        assert got["status"] == "cancelled" and got["output"] is None
        again = client.post(f"/v1/prediction/{pid}/cancel", headers=KEY)
        assert again.status_code == 400 and again.json() == {"error": "Prediction already completed"}
        assert client.post("/v1/prediction/nope/cancel", headers=KEY).status_code == 404


def test_cancel_a_running_prediction_stops_the_engine():
    engine = SlowEngine(delay=0.05)
    with client_for(engine) as client:
        pid = create(client, input={**DOC_INPUT, "max_tokens": "200"}).json()["predictionID"]
        deadline = time.monotonic() + 5
        while client.get(f"/v1/prediction/{pid}", headers=KEY).json()["status"] != "processing":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.post(f"/v1/prediction/{pid}/cancel", headers=KEY).status_code == 200
        assert wait(client, pid)["status"] == "cancelled"
    assert engine.cancelled == 1


def test_rate_limit_429_and_polls_are_never_throttled(tmp_path):
    with client_for(FakeEngine(), tmp_path, rate=2, concurrent=10, runner=False) as client:
        pids = [create(client).json()["predictionID"] for _ in range(2)]
        refused = create(client)
        assert refused.status_code == 429
        assert refused.json()["error"].startswith("Rate limit exceeded. Please retry after ")
        assert 1 <= int(refused.headers["retry-after"]) <= 60 and refused.headers["x-ratelimit-remaining"] == "0"
        assert all(client.get(f"/v1/prediction/{pids[0]}", headers=KEY).status_code == 200 for _ in range(100))


def test_an_11th_unfinished_prediction_is_429(tmp_path):
    with client_for(FakeEngine(), tmp_path, rate=600, concurrent=3, runner=False) as client:
        pids = [create(client).json()["predictionID"] for _ in range(3)]
        refused = create(client)
        assert refused.status_code == 429
        assert refused.json() == {"error": "Too many concurrent predictions (limit 3). Please retry later."}
        assert int(refused.headers["retry-after"]) >= 1
        client.post(f"/v1/prediction/{pids[0]}/cancel", headers=KEY)
        assert create(client).status_code == 200  # a finished one frees its place


def test_run_blocks_until_terminal():
    with client_for(FakeEngine()) as client:
        payload = {"model": "llava-13b", "version": "0.0.1", "input": DOC_INPUT}
        resp = client.post("/v1/prediction/run", json=payload, headers=KEY)
    assert resp.status_code == 200
    assert resp.json()["status"] == "success" and "".join(resp.json()["output"]) == "w0 w1 w2 w3 w4 w5 "
