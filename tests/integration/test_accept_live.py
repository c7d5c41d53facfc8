"""`llava-serve accept` as an operator runs it — the README's command, from the checkout — passes against the live
stack with every check run (webhooks, a second key, a Prometheus endpoint), on a key with production's limits."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import requests

from serve.accept import CHECK_ADMISSIONS, CHECKS, Options
from tests.conftest import ROOT, data_uri, free_port
from tests.integration.conftest import ACCEPT_KEYS
from tests.readme_blocks import README, blocks

DEPLOYING = "Deploying to Kubernetes"
ROW = re.compile(r"  (PASS|FAIL|SKIP)\s+(\S+)\s+[\d.]+s  (.*)")


def readme_command() -> list[str]:
    """The command the README's deployment section ends with."""
    section = README.read_text().split(f"## {DEPLOYING}\n", 1)[1].split("\n## ", 1)[0]
    last = [b for b in blocks() if b.heading == DEPLOYING][-1]
    assert section.rstrip().endswith(f"```bash\n{last.code}```"), "the deployment section does not end with a command"
    return shlex.split(last.code)


def with_value(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def test_the_readme_command_accepts_the_live_stack(stack, report_cost):
    argv = readme_command()
    assert argv[:2] == [".venv/bin/llava-serve", "accept"]
    first, second = (k["key"] for k in ACCEPT_KEYS)
    argv = with_value(with_value(argv, "--url", stack), "--key", first)
    argv += ["--second-key", second, "--webhook-listen", f"127.0.0.1:{free_port()}", "--metrics-url",
             f"{stack}/metrics", "--load-seconds", "3"]
    exe = Path(sys.executable).parent / "llava-serve"  # the checkout's .venv/bin/llava-serve
    started = time.monotonic()
    proc = subprocess.run([str(exe), *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    report_cost(f"llava-serve accept on the live stack: {time.monotonic() - started:.1f} s")
    print(proc.stdout)  # the report, in the log of a failed run or with -rP
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    rows = {m[2]: (m[1], m[3]) for m in map(ROW.fullmatch, proc.stdout.splitlines()) if m}
    assert list(rows) == [name for name, _ in CHECKS], proc.stdout
    assert all(result == "PASS" for result, _ in rows.values()), proc.stdout
    assert f"ACCEPTED: {len(rows)} checks passed, 0 skipped" in proc.stdout
    assert rows["limits.headers"][1].startswith(f"on all {CHECK_ADMISSIONS} admitted answers"), rows["limits.headers"]
    assert rows["metrics.api-port"][1].startswith("answers 200"), rows["metrics.api-port"]  # the test stack has it on
    assert "ray_llava_" in rows["metrics.scrape"][1]
    assert re.search(r"measured: +TTFT p50 \d+ ms, p95 \d+ ms; [\d.]+ output tokens/s; [\d.]+ requests/s",
                     proc.stdout), proc.stdout
    assert "ratio (above 1 is better than the model): TTFT" in proc.stdout

    # The run stayed within the key's budget, as the README and the help say: one more admission finds at
    # least the rest of the minute's 60 left.
    spent_at_most = CHECK_ADMISSIONS + Options.load_requests
    r = requests.post(f"{stack}/fal-ai/llavav15-13b", headers={"Authorization": f"Key {first}"}, timeout=60,
                      json={"prompt": "hi", "image_url": data_uri(), "max_new_tokens": 1})
    assert r.status_code == 200 and int(r.headers["X-RateLimit-Remaining"]) >= 60 - spent_at_most - 1
