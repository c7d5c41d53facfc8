"""Reading k8s/grafana/llava-serve-dashboard.json: its panels, PromQL expressions and the metric
names they reference (shared by the unit test and the live test that checks them against /metrics)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "k8s" / "grafana" / "llava-serve-dashboard.json"

# A metric name as Ray's metrics agent exports it; histogram suffixes (_bucket, _sum, _count) are
# part of the match, as written in the expression.
METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])ray_[a-z0-9_:]+")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def load_dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def iter_panels(dashboard: dict | None = None) -> Iterator[dict]:
    """Every panel, rows included, and the panels nested in collapsed rows."""
    dashboard = load_dashboard() if dashboard is None else dashboard
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(dashboard: dict | None = None) -> list[str]:
    return [t["expr"] for p in iter_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def strip_strings(expr: str) -> str:
    """The expression with its string literals (label values) emptied."""
    return _STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(strip_strings(expr)))


def dashboard_metric_names(dashboard: dict | None = None) -> set[str]:
    """Every metric name the dashboard's expressions reference, e.g.
    `ray_llava_requests_total`, `ray_llava_request_duration_seconds_bucket`."""
    return set().union(*(metric_names(e) for e in dashboard_exprs(dashboard)))
