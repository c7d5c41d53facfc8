"""Metrics and logs after real traffic on the live stack: `/metrics` parsed with prometheus_client's
parser (ours and vLLM's, through Ray's metrics export), and the JSON access lines in the replicas'
logs, keyed by the request id every API answer carries."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LOCAL_KEY, data_uri
from tests.dashboard import dashboard_metric_names
from tests.integration.conftest import SOLO_KEY

FAL = "fal-ai/llavav15-13b"
AUTH = {"Authorization": f"Key {LOCAL_KEY}"}
EACH = {"X-API-Key": "local-each-key"}


def scrape(base: str) -> dict[str, dict[tuple, float]]:
    """name -> {sorted labels without Ray's own: value}, summed over processes."""
    resp = requests.get(f"{base}/metrics", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items()
                                  if k not in ("WorkerId", "NodeAddress", "SessionName", "Version", "Component",
                                               "ReplicaId") and not k.startswith("otel_")))
            out[sample.name][labels] += sample.value
    return out


def value(snapshot, name, /, **labels) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for key, v in snapshot.get(name, {}).items() if want <= set(key))


def traffic(base: str) -> dict:
    ids = {}
    run = requests.post(f"{base}/{FAL}", json={"prompt": "hi", "image_url": data_uri(), "max_new_tokens": 7},
                        headers=AUTH, timeout=60)
    ids["run"] = run.headers["x-fal-request-id"]
    stream = requests.post(f"{base}/{FAL}/stream", json={"prompt": "hi", "image_url": data_uri(), "max_new_tokens": 5},
                           headers=AUTH, timeout=60)
    assert stream.status_code == 200
    sub = requests.post(f"{base}/queue/{FAL}", json={"prompt": "hi", "image_url": data_uri(), "max_new_tokens": 3},
                        headers=AUTH, timeout=60).json()
    ids["submit"] = sub["request_id"]
    while requests.get(sub["status_url"], headers=AUTH, timeout=10).json()["status"] != "COMPLETED":
        time.sleep(0.05)
    assert requests.get(sub["response_url"], headers=AUTH, timeout=10).status_code == 200
    created = requests.post(f"{base}/v1/prediction/", headers=EACH, timeout=30, json={
        "model": "llava-13b", "version": "0.0.1",
        "input": {"image": data_uri(), "prompt": "hi", "max_tokens": "4", "temperature": "0.2", "top_p": "1"}}).json()
    ids["create"] = created["predictionID"]
    while requests.get(f"{base}/v1/prediction/{ids['create']}", headers=EACH, timeout=10).json()["status"] != "success":
        time.sleep(0.05)
    # One 429 for concurrency: the solo key's one slot is held by a stream.
    solo = {"Authorization": f"Key {SOLO_KEY}"}
    body = {"prompt": "hi", "image_url": data_uri(), "max_new_tokens": 400}
    with requests.post(f"{base}/{FAL}/stream", json=body, headers=solo, stream=True, timeout=60) as held:
        lines = held.iter_lines()
        next(lines)
        refused = requests.post(f"{base}/{FAL}", json=body, headers=solo, timeout=60)
        assert refused.status_code == 429
        ids["refused"] = refused.headers["x-fal-request-id"]
        for _ in lines:  # let it finish: nothing aborted, the slot comes back
            pass
    return ids


def wait_for(base, check, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        snapshot = scrape(base)
        if check(snapshot) or time.monotonic() > deadline:
            return snapshot
        time.sleep(0.5)


def test_metrics_move_with_traffic(stack):
    before = scrape(stack)
    traffic(stack)
    out = "ray_llava_output_tokens_total"
    streams = {"api": "fal", "route": "stream", "status": "200"}
    after = wait_for(stack, lambda s: value(s, out, api="eachlabs", key="local-eachlabs")
                     >= value(before, out, api="eachlabs", key="local-eachlabs") + 4
                     and value(s, "ray_llava_requests_total", **streams)
                     >= value(before, "ray_llava_requests_total", **streams) + 2)  # the last request to end

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    req = "ray_llava_requests_total"
    assert delta(req, api="fal", route="run", status="200") >= 1
    assert delta(req, api="fal", route="stream", status="200") >= 2
    assert delta(req, api="fal", route="submit", status="200") >= 1
    assert delta(req, api="fal", route="status", status="202") + delta(req, api="fal", route="status", status="200") >= 1
    assert delta(req, api="fal", route="run", status="429") >= 1
    assert delta(req, api="eachlabs", route="create", status="200") >= 1
    assert delta(req, api="eachlabs", route="get", status="200") >= 1
    assert delta("ray_llava_rate_limited_total", api="fal", key="tests-solo", reason="concurrency") == 1
    # Tokens by key name (never the key): exactly what the Eachlabs prediction generated.
    assert delta(out, api="eachlabs", key="local-eachlabs") == 4
    assert delta(out, api="fal", key="local-dev") >= 7 + 5 + 3
    assert not any(LOCAL_KEY in str(labels) for series in after.values() for labels in series)
    for mode in ("sync", "stream", "job"):
        assert delta("ray_llava_time_to_first_token_seconds_count", mode=mode) >= 1, mode
    assert delta("ray_llava_request_duration_seconds_count", api="fal", route="run") >= 1
    assert delta("ray_llava_image_fetch_seconds_count", source="data") >= 5
    assert delta("ray_llava_image_bytes_sum", source="data") > 0
    # vLLM's own metrics, from the engine replica, through the same export.
    assert delta("ray_vllm_generation_tokens_total") >= 7 + 5 + 3 + 4
    assert delta("ray_vllm_time_to_first_token_seconds_count") >= 5
    assert "ray_vllm_num_requests_running" in after and "ray_vllm_kv_cache_usage_perc" in after
    assert delta("ray_llava_queue_wait_seconds_count", api="fal") >= 1
    assert delta("ray_llava_queue_wait_seconds_count", api="eachlabs") >= 1
    assert {("state", "queued"), ("state", "running")} <= {lbl for key in after["ray_llava_jobs"] for lbl in key}
    # Every metric the Grafana dashboard plots is one the stack really exports.
    assert dashboard_metric_names() <= set(after), dashboard_metric_names() - set(after)


def access_lines() -> list[dict]:
    """The JSON access lines the ingress replicas wrote (Ray keeps each worker's stderr in a file)."""
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    lines = []
    for path in Path(logs).glob("worker-*.err"):
        for line in path.read_text(errors="replace").splitlines():
            if '"logger": "llava_serve.access"' in line:
                lines.append(json.loads(line[line.index("{"):]))
    return lines


def test_json_access_lines_carry_the_request_ids(stack):
    ids = traffic(stack)
    deadline = time.monotonic() + 10
    while True:
        lines = {(line["request_id"], line["route"]): line for line in access_lines()}
        wanted = [(ids["run"], "run"), (ids["submit"], "submit"), (ids["submit"], "result"),
                  (ids["create"], "create"), (ids["refused"], "run")]
        if all(k in lines for k in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    run = lines[ids["run"], "run"]
    assert run["key"] == "local-dev" and run["api"] == "fal" and run["status"] == 200 and run["level"] == "INFO"
    assert run["duration_ms"] > 0 and run["first_byte_ms"] <= run["duration_ms"] and run["method"] == "POST"
    # One id for one request everywhere: the submit, its status polls and its result share the job's id.
    assert lines[ids["submit"], "submit"]["status"] == 200 and lines[ids["submit"], "result"]["status"] == 200
    created = lines[ids["create"], "create"]  # an Eachlabs create is logged under its prediction id
    assert created["api"] == "eachlabs" and created["key"] == "local-eachlabs"
    # Its polls are counted, not logged one by one (telemetry.log_polls is off by default).
    assert (ids["create"], "get") not in lines and (ids["submit"], "status") not in lines
    refused = lines[ids["refused"], "run"]
    assert refused["status"] == 429 and refused["key"] == "tests-solo"
    assert all(LOCAL_KEY not in json.dumps(line) for line in lines.values())  # names, never keys
