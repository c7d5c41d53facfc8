"""fal synchronous run, wire level (docs/api.md §2.1–2.3, §2.7), with a fake engine behind the real app."""

import uuid

import pytest
from fastapi.testclient import TestClient

from serve.engine.types import EngineInputError, EngineUnavailable
from serve.ingress import create_app
from tests.conftest import LOCAL_KEY, data_uri
from tests.fakes import FakeEngine, make_services

URL = "/fal-ai/llavav15-13b"
AUTH = {"Authorization": f"Key {LOCAL_KEY}"}


def client_for(engine: FakeEngine) -> TestClient:
    return TestClient(create_app(make_services(engine)))


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def client(engine):
    return client_for(engine)


def body(**kw):
    return {"prompt": "Who drew this?", "image_url": data_uri(), **kw}


def assert_request_id(resp):
    uuid.UUID(resp.headers["x-fal-request-id"])


def test_run_returns_output_partial_stats_and_request_id(client, engine):
    resp = client.post(URL, json=body(), headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert_request_id(resp)
    out = resp.json()
    assert out == {
        "output": "".join(f"w{i} " for i in range(64)),
        "partial": False,
        "stats": {"num_input_tokens": 600, "num_output_tokens": 64},
    }
    req = engine.requests[0]
    assert req.request_id == resp.headers["x-fal-request-id"]  # one id end to end
    assert req.owner == "local-dev"
    assert req.prompt.endswith("USER: <image>\nWho drew this? ASSISTANT:")
    assert (req.max_tokens, req.temperature, req.top_p) == (64, 0.2, 1.0)  # fal's defaults
    assert req.image.mode == "RGB" and req.image.size == (64, 48)


def test_max_tokens_alias_coercion_and_unknown_fields(client, engine):
    client.post(URL, json=body(max_tokens=7, temperature="0", top_p="0.5", seed=3, sync_mode=True), headers=AUTH)
    client.post(URL, json=body(max_tokens=7, max_new_tokens="9"), headers=AUTH)
    first, second = engine.requests
    assert (first.max_tokens, first.temperature, first.top_p) == (7, 0.0, 0.5)
    assert second.max_tokens == 9  # max_new_tokens wins over the alias


def test_top_p_zero_is_accepted(client, engine):
    assert client.post(URL, json=body(top_p=0), headers=AUTH).status_code == 200
    assert 0 < engine.requests[0].top_p < 1e-3


@pytest.mark.parametrize("header", [f"Key {LOCAL_KEY}", f"Bearer {LOCAL_KEY}", f"key  {LOCAL_KEY} "])
def test_accepted_auth_schemes(client, header):
    assert client.post(URL, json=body(), headers={"Authorization": header}).status_code == 200


@pytest.mark.parametrize(
    "headers, detail",
    [
        ({}, "Authentication is required"),
        ({"Authorization": "Key wrong-key-123"}, "No user found for Key ID and Secret"),
        ({"Authorization": f"Basic {LOCAL_KEY}"}, "No user found for Key ID and Secret"),
        ({"Authorization": "Key"}, "No user found for Key ID and Secret"),
    ],
)
def test_401_shapes(client, engine, headers, detail):
    resp = client.post(URL, json=body(), headers=headers)
    assert resp.status_code == 401
    assert resp.json() == {"detail": detail}
    assert_request_id(resp)
    assert engine.requests == []


def test_auth_is_checked_before_the_body(client):
    assert client.post(URL, content=b"not json", headers={"Content-Type": "application/json"}).status_code == 401


@pytest.mark.parametrize(
    "payload, loc, err_type",
    [
        ({"image_url": "data:,x"}, ["body", "prompt"], "missing"),
        ({"prompt": "hi"}, ["body", "image_url"], "missing"),
        (body(temperature=1.5), ["body", "temperature"], "less_than_equal"),
        (body(max_new_tokens=0), ["body", "max_new_tokens"], "greater_than_equal"),
        (body(max_new_tokens=4096), ["body", "max_new_tokens"], "less_than_equal"),
        (body(max_tokens="many"), ["body", "max_tokens"], "int_parsing"),
        (body(top_p=-0.1), ["body", "top_p"], "greater_than_equal"),
        (body(prompt=42), ["body", "prompt"], "string_type"),
    ],
)
def test_422_detail_lists(client, engine, payload, loc, err_type):
    resp = client.post(URL, json=payload, headers=AUTH)
    assert resp.status_code == 422, resp.text
    assert_request_id(resp)
    detail = resp.json()["detail"]
    assert isinstance(detail, list) and detail[0]["loc"] == loc and detail[0]["type"] == err_type
    assert detail[0]["msg"]
    assert engine.requests == []


def test_422_for_a_body_that_is_not_a_json_object(client):
    for raw in (b"not json", b"[1, 2]", b""):
        resp = client.post(URL, content=raw, headers={**AUTH, "Content-Type": "application/json"})
        assert resp.status_code == 422
        assert resp.json()["detail"][0]["loc"][0] == "body"


def test_range_error_carries_ctx(client):
    item = client.post(URL, json=body(temperature=1.5), headers=AUTH).json()["detail"][0]
    assert item["ctx"] == {"le": 1.0} and item["input"] == 1.5


@pytest.mark.parametrize(
    "image_url, err_type",
    [
        ("data:image/png;base64,!!!", "image_load_error"),
        ("data:image/png;base64,aGVsbG8=", "image_load_error"),
        ("gopher://example.com/x", "image_load_error"),
        ("http://127.0.0.1:1/x.png", "file_download_error"),
    ],
)
def test_image_errors_are_422_with_fal_types(client, engine, image_url, err_type):
    resp = client.post(URL, json=body(image_url=image_url), headers=AUTH)
    assert resp.status_code == 422
    item = resp.json()["detail"][0]
    assert item["loc"] == ["body", "image_url"] and item["type"] == err_type
    assert item["url"].endswith(err_type) and item["input"] == image_url and item["msg"]
    assert engine.requests == []


def test_engine_input_error_is_422_on_prompt():
    client = client_for(FakeEngine(fail_with=EngineInputError("prompt is longer than the context")))
    resp = client.post(URL, json=body(), headers=AUTH)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["body", "prompt"]


def test_engine_down_is_503_runner_disconnected():
    client = client_for(FakeEngine(fail_with=EngineUnavailable("dead")))
    resp = client.post(URL, json=body(), headers=AUTH)
    assert resp.status_code == 503
    assert resp.json()["error_type"] == "runner_disconnected"
    assert resp.headers["x-fal-error-type"] == "runner_disconnected"
    assert_request_id(resp)


def test_unexpected_failure_is_a_fal_500_with_ids():
    client = client_for(FakeEngine(fail_with=RuntimeError("bug")))
    resp = client.post(URL, json=body(), headers=AUTH)
    assert resp.status_code == 500
    assert resp.json() == {"detail": "Internal Server Error", "error_type": "internal_server_error"}
    assert resp.headers["x-fal-error-type"] == "internal_server_error"
    assert_request_id(resp)


@pytest.mark.parametrize("kind, code, error_type", [
    ("worker_lost", 503, "runner_disconnected"),
    ("cancelled", 400, "request_cancelled"),
    ("start_timeout", 504, "request_timeout"),
    ("internal", 500, "internal_server_error"),
])
def test_result_of_a_job_ended_without_its_own_error(kind, code, error_type):
    from serve.api.fal.protocol import outcome, status_body
    from serve.jobs.models import Job, JobError, JobStatus

    job = Job(id="r1", owner="o", api="fal", input={}, max_concurrent=1, created_at=1.0, started_at=2.0,
              finished_at=3.5, status=JobStatus.FAILED, error=JobError(kind=kind, message="Worker lost."))
    status, body, headers = outcome(job)
    assert (status, body["error_type"], headers["x-fal-error-type"]) == (code, error_type, error_type)
    summary = status_body(job, "http://h/queue/", with_logs=False)
    assert summary["status"] == "COMPLETED" and summary["error_type"] == error_type
    assert summary["metrics"] == {"inference_time": 1.5}


def test_unknown_app_is_404_and_wrong_method_405(client):
    assert client.post("/fal-ai/other-model", json=body(), headers=AUTH).json() == {"detail": "Not Found"}
    assert client.get(URL, headers=AUTH).status_code == 405


def test_health_and_readiness():
    engine = FakeEngine(healthy=False)
    services = make_services(engine)
    ingress = services.config.ingress.model_copy(update={"readiness_cache_s": 0})  # every probe checks
    services.config = services.config.model_copy(update={"ingress": ingress})
    client = TestClient(create_app(services))
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    engine.healthy = True
    assert client.get("/readyz").json() == {"status": "ready"}
