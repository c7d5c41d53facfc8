"""Eachlabs predictions on the live stack with real clients: the documented Python code, the JS SDK."""

from __future__ import annotations

import time

import requests

from tests.conftest import Receiver, data_uri
from tests.integration.conftest import run_js, wait_for_abort

KEY = "local-each-key"


def test_documented_python_client(stack):
    # docs/api.md §5.3, base URL swapped (and a data: URI for the image, max_tokens lowered).
    BASE = stack
    H = {"X-API-Key": KEY, "Content-Type": "application/json"}
    pid = requests.post(f"{BASE}/v1/prediction/", headers=H, json={
        "model": "llava-13b", "version": "0.0.1",
        "input": {"image": data_uri(), "top_p": "1", "prompt": "Describe",
                  "max_tokens": "24", "temperature": "0.2"}}).json()["predictionID"]
    while (r := requests.get(f"{BASE}/v1/prediction/{pid}", headers=H).json())["status"] not in ("success", "error", "cancelled"):
        time.sleep(1)
    assert r["status"] == "success", r
    assert isinstance(r["output"], list) and len("".join(r["output"])) == 24  # one character per token
    assert len(r["output"]) > 1  # the chunks as the engine streamed them
    assert r["input"]["max_tokens"] == "24" and r["metrics"]["predict_time"] > 0
    assert r["urls"]["get"] == f"{BASE}/v1/prediction/{pid}"


def sdk(stack, scenario):
    return run_js("eachlabs.cjs", scenario, env={"LLAVA_BASE_URL": stack, "EACH_API_KEY": KEY, "IMAGE": data_uri()})


def test_js_sdk_create_and_get(stack):
    out = sdk(stack, "create_get")
    assert out["created"]["status"] == "success" and out["created"]["predictionID"]
    assert out["done"]["status"] == "success" and len("".join(out["done"]["output"])) == 8


def test_js_sdk_cancel_of_a_running_prediction(stack, engine_stats):
    before = engine_stats()
    out = sdk(stack, "cancel")
    assert out["cancelled"] == {"status": "success", "message": "Prediction cancelled successfully"}
    assert out["done"]["status"] == "cancelled" and out["done"]["output"] is None
    assert wait_for_abort(engine_stats, before)["aborted"] == before["aborted"] + 1  # the engine request too


def test_js_sdk_run(stack):
    done = sdk(stack, "run")["done"]
    assert done["status"] == "success" and len("".join(done["output"])) == 4


def test_js_sdk_sees_errors_in_eachlabs_shape(stack):
    failures = sdk(stack, "errors")["failures"]
    assert failures[0].startswith("Request failed: ") and "Invalid input for model: image" in failures[0]
    assert failures[1] == 'Request failed: {"error":"Prediction not found"}'


def test_webhooks_on_success_and_failure(stack):
    rx = Receiver([200])
    try:
        H = {"X-API-Key": KEY}
        base = {"model": "llava-13b", "version": "0.0.1", "webhook_url": rx.url, "webhook_secret": "s3cret"}
        ok = requests.post(f"{stack}/v1/prediction/", headers=H, json={
            **base, "input": {"image": data_uri(), "prompt": "Describe", "max_tokens": "5"}}).json()["predictionID"]
        bad = requests.post(f"{stack}/v1/prediction/", headers=H, json={
            **base, "input": {"image": "data:image/png;base64,aGVsbG8=", "prompt": "Describe"}}).json()["predictionID"]
        deadline = time.monotonic() + 30
        while len(rx.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        by_id = {body["exec_id"]: (body, headers) for body, headers in rx.calls}
        assert by_id[ok][0]["status"] == "succeeded" and len("".join(by_id[ok][0]["output"])) == 5
        assert by_id[bad][0]["status"] == "failed"
        assert by_id[bad][0]["output"][0]["error"]["error_code"] == "INPUT_VALIDATION_ERROR"
        assert all(headers["X-Webhook-Secret"] == "s3cret" for _, headers in rx.calls)
    finally:
        rx.close()
