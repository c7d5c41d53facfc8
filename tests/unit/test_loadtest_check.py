"""loadtest/check.py, the load test's judge: it must fail a run with unexpected errors, a path that never
completed, or a key admitted above its limit, and pass a clean one."""

from __future__ import annotations

import csv
import json
import sys

import yaml

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "loadtest"))
import check  # noqa: E402

NAMES = ["fal run", "fal run [429]", "fal stream: complete", "fal queue: complete", "eachlabs: complete", "openai chat",
         "openai stream: complete"]


def write_run(tmp_path, failures=0, admitted=None, counts=None, exceptions=0):
    counts = {n: 5 for n in NAMES} | (counts or {})
    with open(tmp_path / "run_stats.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["Type", "Name", "Request Count", "Failure Count"])
        w.writeheader()
        for name, n in counts.items():
            w.writerow({"Type": "POST", "Name": name, "Request Count": n, "Failure Count": 0})
        w.writerow({"Type": "", "Name": "Aggregated", "Request Count": sum(counts.values()), "Failure Count": failures})
    with open(tmp_path / "run_failures.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["Method", "Name", "Error", "Occurrences"])
        w.writeheader()
        if failures:
            w.writerow({"Method": "POST", "Name": "fal run", "Error": "HTTP 500", "Occurrences": failures})
    with open(tmp_path / "run_exceptions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["Count", "Message", "Traceback", "Nodes"])
        w.writeheader()
        if exceptions:
            w.writerow({"Count": exceptions, "Message": "KeyError: 'request_id'", "Traceback": "...", "Nodes": "local"})
    (tmp_path / "admissions.json").write_text(json.dumps(admitted or {"key-a-123": [0.0, 1.0]}))
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump([{"key": "key-a-123", "name": "team-a", "rate_per_minute": 3}]))
    return tmp_path / "run", tmp_path / "admissions.json", tmp_path / "keys.yaml"


def test_a_clean_run_passes(tmp_path, capsys):
    assert check.judge(*write_run(tmp_path)) == []
    out = capsys.readouterr().out
    assert "team-a: [2] (3/min)" in out and "{'fal run': 5}" in out


def test_unexpected_errors_fail(tmp_path):
    assert check.judge(*write_run(tmp_path, failures=2)) == ["2 x POST fal run: HTTP 500"]


def test_an_exception_inside_a_task_fails(tmp_path):
    assert check.judge(*write_run(tmp_path, exceptions=3)) == ["3 x exception in a task: KeyError: 'request_id'"]


def test_a_path_that_never_completed_fails(tmp_path):
    assert check.judge(*write_run(tmp_path, counts={"eachlabs: complete": 0})) == ["eachlabs: complete: never completed"]


def test_over_admission_fails_and_spread_admissions_pass(tmp_path):
    over = {"key-a-123": [0.0, 10.0, 20.0, 30.0]}  # 4 within 55 s, limit 3
    assert any("admitted 4 requests" in p for p in check.judge(*write_run(tmp_path, admitted=over)))
    spread = {"key-a-123": [0.0, 10.0, 20.0, 60.0, 70.0, 80.0]}  # 3 per minute, twice
    assert check.judge(*write_run(tmp_path, admitted=spread)) == []


def test_sliding_max():
    assert check.sliding_max([0, 1, 2, 58.9, 59.5, 200], 59) == 4
    assert check.sliding_max([0, 1, 2, 58.9, 59.5, 200], 55) == 3
    assert check.sliding_max([], 59) == 0
