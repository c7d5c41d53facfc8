"""The live stack — local Ray + Serve + vLLM CPU + the tiny model — started once per session."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest
from ray import serve

from serve.app import ENGINE_DEPLOYMENT
from serve.config import ServeConfig, parse_config
from serve.jobs.factory import build_store
from serve.jobs.store import JobStore
from tests.conftest import CONFIGS, ROOT, Clock, local_stack_data, running_stack

sys.path.insert(0, str(ROOT / "loadtest"))
import stack as loadtest_stack  # noqa: E402


RATE_KEY, RATE_LIMIT = "tests-rate-key-1", 30
CONC_KEY, CONC_LIMIT = "tests-conc-key-1", 3
SOLO_KEY = "tests-solo-key-1"  # one request at a time: start timeouts, slots held by streams
SHARED_KEY, SHARED_LIMIT = "tests-shared-key-1", 3  # one budget across fal, Eachlabs and OpenAI
# `llava-serve accept` (test_accept_live.py): production's default limits, which one run must fit, and a second
# key whose window must stay its own.
ACCEPT_KEYS = [
    {"key": "tests-accept-1", "name": "tests-accept", "rate_per_minute": 60, "max_concurrent": 10},
    {"key": "tests-accept-2", "name": "tests-accept-2", "rate_per_minute": 60, "max_concurrent": 10},
]
LOAD_KEYS = [
    {"key": "tests-load-fal-1", "name": "tests-load-fal", "rate_per_minute": 60, "max_concurrent": 10},
    {"key": "tests-load-burst-1", "name": "tests-load-burst", "rate_per_minute": 600, "max_concurrent": 32},
    {"key": "tests-load-each-1", "name": "tests-load-each", "rate_per_minute": 60, "max_concurrent": 10},
    {"key": "tests-load-openai-1", "name": "tests-load-openai", "rate_per_minute": 60, "max_concurrent": 10},
]
TEST_KEYS = [
    # The general key (the README's too) gets room for the whole suite; the others test the limits.
    {"key": "local-test-key", "name": "local-dev", "rate_per_minute": 100_000, "max_concurrent": 64},
    {"key": "local-each-key", "name": "local-eachlabs", "rate_per_minute": 100_000, "max_concurrent": 64},
    {"key": RATE_KEY, "name": "tests-rate", "rate_per_minute": RATE_LIMIT, "max_concurrent": 1000},
    {"key": CONC_KEY, "name": "tests-conc", "rate_per_minute": 100_000, "max_concurrent": CONC_LIMIT},
    {"key": SOLO_KEY, "name": "tests-solo", "rate_per_minute": 100_000, "max_concurrent": 1},
    {"key": SHARED_KEY, "name": "tests-shared", "rate_per_minute": SHARED_LIMIT, "max_concurrent": 10},
    # The Locust smoke (test_loadtest_live.py): production's default limits, and one key with room.
    *LOAD_KEYS,
    *ACCEPT_KEYS,
]


@pytest.fixture(scope="session")
def stack_config(tiny_model_dir, tmp_path_factory) -> ServeConfig:
    data = local_stack_data(tiny_model_dir, TEST_KEYS, tmp_path_factory.mktemp("keys"))
    data["ingress"]["num_replicas"] = 2  # limits and jobs must hold across replicas
    # Pinned by a custom resource, as in production: `llava-serve run` must offer it on its one machine.
    data["ingress"]["resources"] = {"llava_ingress": 1}
    data["jobs"] = {"lease_s": 3.0, "reap_interval_s": 0.5, "outage_after_s": 1.5}  # quick crash recovery
    # The tests' own image server runs on 127.0.0.1; every other non-public address stays refused.
    data["media"]["allow_networks"] = ["127.0.0.1/32"]
    data["telemetry"] = {"metrics_report_interval_s": 1.0, "metrics_route": True}  # metrics reach /metrics within a second or two
    return parse_config(data, CONFIGS, env={})


@pytest.fixture(scope="package")
def stack(stack_config):
    """Base URL of the running stack; Serve and Ray are shut down when the integration tests end."""
    with running_stack(stack_config) as base:
        yield base


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def job_store(stack, stack_config) -> JobStore:
    """The deployment's own store (the named actor its ingress replicas share), from the test process."""
    return build_store(stack_config)


@pytest.fixture
def engine_stats(stack, stack_config):
    """Reads the engine replica's counters (running, peak_running, finished, aborted)."""
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=stack_config.app_name)
    return lambda: handle.stats.remote().result()


def wait_for_abort(engine_stats, before: dict, timeout_s: float = 15.0) -> dict:
    """Poll the engine counters until one more request was aborted and none is running."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = engine_stats()
        if (now["aborted"] > before["aborted"] and now["running"] == 0) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


JS_CLIENTS = ROOT / "tests" / "clients" / "js"


def replica_of(job) -> str:
    """The Serve replica (its actor's name) whose runner holds `job`: runners claim as "<replica id>#<claim>"."""
    return job.runner.rsplit("#", 1)[0]


def run_js(script: str, *args: str, env: dict[str, str]) -> dict:
    """Run a JS client script (tests/clients/js) with `env` added, and return its last `RESULT <json>` line."""
    proc = subprocess.run(["node", script, *args], cwd=JS_CLIENTS, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120, check=False)
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, (
        f"{script} {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return results[-1]


def exchange(base: str, head: str, body_chunks=(), timeout: float = 10.0) -> tuple[int, dict, float]:
    """Send a request's head (and any body chunks) on a raw socket; the status, JSON body and seconds taken."""
    url = urlsplit(base)
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        sock.sendall(head.encode())
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed while we were still sending
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < length(data):
            got = sock.recv(65536)
            if not got:
                break
            data += got
    seconds = time.monotonic() - started
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1][: length(data)]), seconds


def length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A private redis-server for the Redis store tests, stopped when the session ends."""
    with loadtest_stack.redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
