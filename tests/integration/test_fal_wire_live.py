"""fal's status codes and headers (docs/api.md §2.5–2.8) as they leave the live stack: through Ray
Serve's HTTP proxy, which must pass every header, the Host and SSE through untouched."""

from __future__ import annotations

import time
import uuid

import requests

from tests.conftest import LOCAL_KEY, data_uri

APP = "fal-ai/llavav15-13b"
AUTH = {"Authorization": f"Key {LOCAL_KEY}"}


def body(n=4, **kw):
    return {"prompt": "Describe", "image_url": data_uri(), "max_new_tokens": n, **kw}


def wait_done(base, rid, timeout=60.0):
    deadline = time.monotonic() + timeout
    status = f"{base}/queue/{APP}/requests/{rid}/status"
    while (resp := requests.get(status, headers=AUTH, timeout=10)).status_code != 200:
        assert resp.status_code == 202 and time.monotonic() < deadline, resp.text
        time.sleep(0.05)
    return resp


def test_queue_lifecycle_codes_and_headers(stack):
    sub = requests.post(f"{stack}/queue/{APP}", json=body(400), headers=AUTH, timeout=10)
    rid = sub.json()["request_id"]
    assert sub.status_code == 200 and sub.headers["x-fal-request-id"] == rid
    assert sub.headers["X-RateLimit-Limit"] and sub.headers["RateLimit-Policy"].startswith('"default"')
    assert sub.json()["status_url"] == f"{stack}/queue/{APP}/requests/{rid}/status"  # reachable as given

    early = requests.get(f"{stack}/queue/{APP}/requests/{rid}", headers=AUTH, timeout=10)
    assert (early.status_code, early.json()) == (400, {"detail": "Request is still in progress"})
    assert early.headers["x-fal-request-id"] == rid
    done = wait_done(stack, rid)
    assert done.headers["x-fal-request-id"] == rid and done.json()["status"] == "COMPLETED"

    result = requests.get(f"{stack}/{APP}/requests/{rid}", headers=AUTH, timeout=10)  # no /queue: same route
    assert result.status_code == 200 and result.headers["x-fal-request-id"] == rid
    assert result.json()["stats"]["num_output_tokens"] == 400
    again = requests.put(f"{stack}/queue/{APP}/requests/{rid}/cancel", headers=AUTH, timeout=10)
    assert (again.status_code, again.json()) == (400, {"status": "ALREADY_COMPLETED"})
    unknown = str(uuid.uuid4())
    gone = requests.put(f"{stack}/queue/{APP}/requests/{unknown}/cancel", headers=AUTH, timeout=10)
    assert (gone.status_code, gone.json(), gone.headers["x-fal-request-id"]) == (404, {"status": "NOT_FOUND"}, unknown)
    missing = requests.get(f"{stack}/queue/{APP}/requests/{unknown}/status", headers=AUTH, timeout=10)
    assert (missing.status_code, missing.json()) == (404, {"detail": "Request not found"})


def test_queue_host_routes_to_the_queue(stack):
    port = stack.rsplit(":", 1)[1]
    resp = requests.post(f"{stack}/{APP}", json=body(), headers={**AUTH, "Host": f"queue.localhost:{port}"},
                         timeout=10)
    got = resp.json()
    assert got["status"] == "IN_QUEUE"
    assert got["cancel_url"] == f"http://queue.localhost:{port}/{APP}/requests/{got['request_id']}/cancel"
    wait_done(stack, got["request_id"])


def test_stream_headers_and_events(stack):
    resp = requests.post(f"{stack}/{APP}/stream", json=body(6), headers={**AUTH, "Accept": "text/event-stream"},
                         timeout=60)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-fal-request-id"]
    events = [line for line in resp.text.split("\n") if line]
    assert all(line.startswith("data: {") for line in events) and '"partial":false' in events[-1]


def test_error_codes_carry_request_ids(stack):
    cases = [
        (requests.post(f"{stack}/{APP}", json=body(), timeout=10), 401, {"detail": "Authentication is required"}),
        (requests.post(f"{stack}/fal-ai/nope", json=body(), headers=AUTH, timeout=10), 404, {"detail": "Not Found"}),
        (requests.get(f"{stack}/{APP}", headers=AUTH, timeout=10), 405, {"detail": "Method Not Allowed"}),
        (requests.post(f"{stack}/queue/{APP}", data=b"{oops", headers={**AUTH, "Content-Type": "application/json"},
                       timeout=10), 422, None),
        (requests.post(f"{stack}/{APP}", json=body(), headers={**AUTH, "X-Fal-Request-Timeout": "0.5"}, timeout=10),
         422, None),
    ]
    for resp, code, expected in cases:
        assert resp.status_code == code, resp.text
        assert resp.headers["content-type"] == "application/json"
        uuid.UUID(resp.headers["x-fal-request-id"])
        if expected is not None:
            assert resp.json() == expected


def test_proxy_mode_and_its_refusals(stack):
    target = {"x-fal-target-url": f"https://fal.run/{APP}"}
    ran = requests.post(f"{stack}/api/fal/proxy", json=body(), headers={**AUTH, **target}, timeout=60)
    assert ran.status_code == 200 and ran.json()["stats"]["num_output_tokens"] == 4
    refused = requests.post(f"{stack}/api/fal/proxy", json=body(), timeout=10,
                            headers={**AUTH, "x-fal-target-url": "https://example.com/x"})
    assert (refused.status_code, refused.text) == (400, "Invalid request")


def test_cors_preflight(stack):
    resp = requests.options(f"{stack}/api/fal/proxy", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-fal-target-url"}, timeout=10)
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "*"
