"""The Locust load smoke (what `make loadtest` runs) against the live stack and its two ingress replicas:
every path of the three APIs completes, nothing unexpected fails, a key driven past its limits gets 429s and
is never admitted above its rate, and Locust writes its CSV and HTML report."""

from __future__ import annotations

import csv
import subprocess
import sys

import yaml

from tests.conftest import ROOT
from tests.integration.conftest import LOAD_KEYS


def test_locust_smoke(stack, tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(LOAD_KEYS))
    fal, burst, each, openai = (k["key"] for k in LOAD_KEYS)
    res = subprocess.run(
        [sys.executable, "loadtest/smoke.py", "--host", stack, "--keys-file", str(keys_file),
         "--fal-keys", f"{fal},{burst}", "--eachlabs-keys", each, "--openai-keys", openai, "--users", "12",
         "--duration", "40", "--out", str(tmp_path / "results")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "load test: passed" in res.stdout
    # The 60/min fal key saw more than 60 requests in 40 s of load: some were refused, as they must be.
    assert "[429]" in (tmp_path / "results" / "loadtest_stats.csv").read_text(), out[-4000:]
    # The OpenAI users found the model, and both their modes, plain and streamed, ran to the end.
    with open(tmp_path / "results" / "loadtest_stats.csv") as f:
        ok = {r["Name"]: int(r["Request Count"]) - int(r["Failure Count"]) for r in csv.DictReader(f)}
    for name in ("openai models", "openai chat", "openai stream", "openai stream: complete"):
        assert ok.get(name, 0) > 0, (name, ok)
    report = res.stdout[res.stdout.index("admitted generation requests per key per minute"):]
    assert "tests-load-fal: [" in report and "tests-load-each: [" in report and "tests-load-openai: [" in report
    assert (tmp_path / "results" / "loadtest.html").stat().st_size > 10_000
