"""Request bodies are bounded at the edge (http.max_body_bytes, serve/api/body.py): over the cap is a 413 in
the API's own shape, decided before the body is parsed, the key's quota untouched and the engine never called;
a caller without a key is answered 401 first. The live stack's test (tests/integration/test_body_caps_live.py)
shows the 413 arriving before a body is sent at all."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from serve.config import ConfigError, load_config, parse_config
from serve.ingress import create_app
from tests.conftest import CONFIGS, LOCAL_KEY, data_uri
from tests.fakes import FakeEngine, make_services

CAP = 100_000
FAL = {"Authorization": f"Key {LOCAL_KEY}"}
EACH = {"X-API-Key": "local-each-key"}
OPENAI = {"Authorization": f"Bearer {LOCAL_KEY}"}
# Each generation route, its key header, a body builder of about n bytes, and its 413's shape.
ROUTES = {
    "fal run": ("/fal-ai/llavav15-13b", FAL, lambda pad: {"prompt": pad, "image_url": data_uri()}),
    "fal stream": ("/fal-ai/llavav15-13b/stream", FAL, lambda pad: {"prompt": pad, "image_url": data_uri()}),
    "fal submit": ("/queue/fal-ai/llavav15-13b", FAL, lambda pad: {"prompt": pad, "image_url": data_uri()}),
    "eachlabs create": ("/v1/prediction/", EACH, lambda pad: {
        "model": "llava-13b", "input": {"image": data_uri(), "prompt": pad}}),
    "eachlabs run": ("/v1/prediction/run", EACH, lambda pad: {
        "model": "llava-13b", "input": {"image": data_uri(), "prompt": pad}}),
    "openai chat": ("/v1/chat/completions", OPENAI, lambda pad: {
        "model": "tiny-llava", "max_tokens": 2, "messages": [{"role": "user", "content": pad}]}),
}


def shape(name: str, resp) -> str:
    """The refusal's message, read the way the API's clients read errors."""
    body = resp.json()
    if name.startswith("fal"):
        assert resp.headers["x-fal-error-type"] == body["error_type"] == "request_too_large"
        return body["detail"]
    if name.startswith("eachlabs"):
        assert set(body) == {"error"}
        return body["error"]
    assert body["error"]["code"] == "request_too_large" and body["error"]["type"] == "invalid_request_error"
    return body["error"]["message"]


@pytest.fixture
def capped():
    engine = FakeEngine()
    services = make_services(engine)
    http = services.config.http.model_copy(update={"max_body_bytes": CAP})
    services.config = services.config.model_copy(update={"http": http})
    return TestClient(create_app(services)), engine


@pytest.mark.parametrize("name", ROUTES)
def test_a_body_over_the_cap_is_413_in_the_apis_shape_before_it_is_parsed(capped, name):
    client, engine = capped
    path, headers, body = ROUTES[name]
    # A body within the cap is read and parsed: here one the API refuses (400/422) after the size check.
    fits = json.dumps(body("x" * (CAP // 2)))[:-1]
    assert client.post(path, content=fits, headers=headers).status_code in (400, 422)
    calls = len(engine.requests)
    for big in (json.dumps(body("x" * CAP)), b"{" * (CAP + 1)):  # valid JSON or not: the size decides first
        resp = client.post(path, content=big, headers=headers)
        assert resp.status_code == 413, resp.text
        assert str(CAP) in shape(name, resp)
    assert len(engine.requests) == calls  # the engine never saw them


def test_refused_bodies_take_no_quota(capped):
    client, _ = capped
    for path, headers, body in ROUTES.values():
        assert client.post(path, content=json.dumps(body("x" * CAP)), headers=headers).status_code == 413
    ok = client.post("/fal-ai/llavav15-13b", json={"prompt": "hi", "image_url": data_uri()}, headers=FAL)
    limit = load_config(CONFIGS / "local-cpu.yaml").limits.rate_per_minute
    assert ok.status_code == 200 and int(ok.headers["x-ratelimit-remaining"]) == limit - 1  # this one only


@pytest.mark.parametrize("name", ROUTES)
def test_no_key_is_401_before_the_body_is_read(capped, name):
    client, _ = capped
    path, _, _ = ROUTES[name]
    assert client.post(path, content=b"x" * (CAP + 1)).status_code == 401


def test_a_body_at_the_cap_is_read():
    client, _ = (TestClient(create_app(make_services(FakeEngine()))), None)
    cap = load_config(CONFIGS / "local-cpu.yaml").http.max_body_bytes
    resp = client.post("/fal-ai/llavav15-13b", content=b" " * (cap - 2) + b"{}", headers=FAL)
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "prompt"]  # parsed: no 413


def test_the_cap_must_admit_the_largest_image_as_a_data_uri():
    data = {"model": {"source": "x"}, "auth": {"keys_file": "keys.local.yaml"},
            "media": {"max_image_bytes": 30 * 1024 * 1024}}
    with pytest.raises(ConfigError, match="http.max_body_bytes"):
        parse_config(data, CONFIGS, env={})
    data["http"] = {"max_body_bytes": 41 * 1024 * 1024}
    assert parse_config(data, CONFIGS, env={}).http.max_body_bytes == 41 * 1024 * 1024
