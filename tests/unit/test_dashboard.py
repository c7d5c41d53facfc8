"""The Grafana dashboard (k8s/grafana/llava-serve-dashboard.json) is importable as-is and only
queries metrics the service and vLLM export. No network, no Ray."""

from __future__ import annotations

import re

import pytest

from tests.dashboard import (
    dashboard_exprs,
    dashboard_metric_names,
    iter_panels,
    load_dashboard,
    metric_names,
    strip_strings,
)

DS = {"type": "prometheus", "uid": "${datasource}"}
UNITS = {"reqps", "s", "percentunit", "short", "bytes"}

HISTOGRAMS = {
    "ray_llava_request_duration_seconds", "ray_llava_time_to_first_token_seconds",
    "ray_llava_queue_wait_seconds", "ray_llava_image_fetch_seconds", "ray_llava_image_bytes",
    "ray_vllm_time_to_first_token_seconds", "ray_vllm_e2e_request_latency_seconds",
    "ray_vllm_request_queue_time_seconds",
}
COUNTERS = {
    "ray_llava_requests_total", "ray_llava_input_tokens_total", "ray_llava_output_tokens_total",
    "ray_llava_generations_total", "ray_llava_rate_limited_total",
    "ray_vllm_generation_tokens_total", "ray_vllm_prompt_tokens_total",
}
GAUGES = {
    "ray_llava_in_flight_requests", "ray_llava_jobs",
    "ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc",
}
# What the service (serve/telemetry/metrics.py) and vLLM's Ray stat logger export.
KNOWN = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

DASHBOARD = load_dashboard()
PANELS = [p for p in iter_panels(DASHBOARD) if p["type"] != "row"]
EXPRS = dashboard_exprs(DASHBOARD)


def test_importable_shape():
    d = DASHBOARD
    assert d["id"] is None
    assert d["uid"] == "llava-serve"
    assert d["title"] == "llava-serve"
    assert d["schemaVersion"] == 39
    assert d["time"] == {"from": "now-1h", "to": "now"}
    assert d["refresh"] == "30s"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    api = variables["api"]
    assert api["type"] == "custom" and api["includeAll"] is True
    assert [s.strip() for s in api["query"].split(",")] == ["fal", "eachlabs", "openai"]
    assert set(variables) == {"datasource", "api"}  # nothing else filters (no job/namespace)


def test_panels_have_unique_ids_and_grid_positions():
    ids = [p["id"] for p in iter_panels(DASHBOARD)]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, int) for i in ids)
    for p in iter_panels(DASHBOARD):
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(g), p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
    rows = [p["title"] for p in DASHBOARD["panels"] if p["type"] == "row"]
    assert rows == ["Traffic", "Latency", "Throughput", "Queue", "Engine", "Images"]


def test_panels_no_overlap():
    cells = {}
    for p in iter_panels(DASHBOARD):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p["title"])
def test_panel(panel):
    assert panel["datasource"] == DS
    targets = panel["targets"]
    assert targets and all(t.get("expr", "").strip() for t in targets)
    for t in targets:
        assert t.get("datasource", DS) == DS
    assert len({t["refId"] for t in targets}) == len(targets)
    assert panel["fieldConfig"]["defaults"]["unit"] in UNITS


def balanced(expr: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for c in strip_strings(expr):
        if c in "([{":
            stack.append(c)
        elif c in pairs:
            if not stack or stack.pop() != pairs[c]:
                return False
    return not stack


def test_balanced_helper():
    assert balanced('sum by (a) (rate(x{a="(]"}[5m]))')
    assert not balanced("sum(rate(x[5m])")
    assert not balanced("sum(x{a=\"b\")}")


@pytest.mark.parametrize("expr", EXPRS)
def test_expr(expr):
    assert balanced(expr)
    assert expr.count('"') % 2 == 0
    names = metric_names(expr)
    assert names
    # Every series carries per-process Ray labels: always aggregate.
    assert re.match(r"^(sum by \(|max by \(|topk\(\d+, sum by \(|histogram_quantile\(0\.\d+, sum by \(le\b)", expr)
    for name in names:
        if name in COUNTERS or name.endswith("_bucket"):
            assert f"rate({name}" in expr and "[$__rate_interval]" in expr, name
    if expr.startswith("histogram_quantile"):
        assert all(n.endswith("_bucket") for n in names)


def test_metric_names():
    names = dashboard_metric_names()
    assert names <= KNOWN, names - KNOWN
    assert "ray_vllm_num_preemptions_total" not in names  # absent until a preemption happens
    assert all(n.startswith(("ray_llava_", "ray_vllm_")) for n in names)
    # Every service metric is on the dashboard.
    service = {n for n in KNOWN if n.startswith("ray_llava_") and not n.endswith(("_sum", "_count"))}
    assert service <= names, service - names


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.5, sum by (le) (rate(ray_a_b_bucket{x="ray_no"}[1m])))') == {
        "ray_a_b_bucket"}
    assert metric_names("sum(ray_x_total) / sum(ray_y:z)") == {"ray_x_total", "ray_y:z"}


def test_api_filter_only_on_api_metrics():
    for expr in EXPRS:
        if "$api" in expr:
            assert metric_names(expr) <= {
                "ray_llava_requests_total", "ray_llava_request_duration_seconds_bucket",
                "ray_llava_time_to_first_token_seconds_bucket", "ray_llava_queue_wait_seconds_bucket",
                "ray_llava_input_tokens_total", "ray_llava_output_tokens_total", "ray_llava_generations_total",
                "ray_llava_rate_limited_total", "ray_llava_in_flight_requests"}, expr


def test_kv_cache_threshold():
    (panel,) = [p for p in PANELS if "ray_vllm_kv_cache_usage_perc" in p["targets"][0]["expr"]]
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["unit"] == "percentunit"
    assert 0.9 in [s["value"] for s in defaults["thresholds"]["steps"]]
    assert defaults["custom"]["thresholdsStyle"]["mode"] != "off"
