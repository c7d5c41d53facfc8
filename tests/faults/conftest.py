"""The fault stack: local Ray + Serve + vLLM CPU + the tiny model, with the Redis store (as in production) on a
redis-server the tests can stop, restart and freeze, and leases short enough that a lost one is seen in
seconds. Each test injects one fault by its real mechanism (kill -9 of the engine or the ingress replica's process,
Redis restarted, stopped, frozen) with a mixed load in flight, every job with a webhook to a receiver here."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from serve.config import ServeConfig, parse_config
from tests.conftest import CONFIGS, free_port, local_stack_data, running_stack

FAL_KEY, EACH_KEY, SYNC_KEY = "faults-fal-key-1", "faults-each-key-1", "faults-sync-key-1"
KEYS = [
    # fal queue jobs: some run, the rest wait queued behind the key's cap.
    {"key": FAL_KEY, "name": "faults-fal", "rate_per_minute": 100_000, "max_concurrent": 4},
    # Eachlabs predictions: queued ones count against the cap (cap_pending), so it has room for the load.
    {"key": EACH_KEY, "name": "faults-each", "rate_per_minute": 100_000, "max_concurrent": 10},
    # fal sync runs.
    {"key": SYNC_KEY, "name": "faults-sync", "rate_per_minute": 100_000, "max_concurrent": 4},
]
LEASE_S = 4.0
# Webhook deliveries short enough to watch: 3 attempts of at most 2 s, 2 s and 4 s apart (a 12 s window), each
# held by its replica for that long before another one takes it over.
WEBHOOKS = {"attempts": 3, "backoff_s": 2.0, "timeout_s": 2.0}
NOTIFY_LEASE_S = 12.0
REAP_INTERVAL_S = 0.5
OUTAGE_AFTER_S = 1.5  # between the reaps and two thirds of a lease


class RedisServer:
    """A private redis-server on one port for the whole session, with an append-only file, so that it can be
    stopped and started again (its data survives) or frozen (SIGSTOP: connections hang, nothing is refused)."""

    def __init__(self, workdir: Path):
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (`make install` installs it)")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.paused = False

    def _cmd(self) -> list[str]:
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log")]

    def client(self):
        """A client of the test's own: it never retries (redis-py's default retries would wait out a freeze)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5,
                           retry=Retry(NoBackoff(), 0))

    def start(self, timeout_s: float = 15.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "redis-server is running"
        import redis

        self.proc = subprocess.Popen(self._cmd(), stdin=subprocess.DEVNULL)
        client, deadline = self.client(), time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():
                        # Loading the AOF answers LOADING: wait until it takes commands.
                        client.get("faults:probe")
                        return
                except (redis.ConnectionError, redis.TimeoutError):  # BusyLoadingError is a ConnectionError
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start; see {self.workdir / 'redis.log'}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """A graceful shutdown (SIGTERM): Redis writes and fsyncs its append-only file, then exits."""
        if self.paused:
            self.resume()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets (connections are accepted by the kernel) and answers nothing."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False


@pytest.fixture(scope="session")
def faults_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("faults-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def faults_config(tiny_model_dir, tmp_path_factory, faults_redis) -> ServeConfig:
    data = local_stack_data(tiny_model_dir, KEYS, tmp_path_factory.mktemp("keys"))
    data["telemetry"]["metrics_route"] = False
    data["store"] = {"backend": "redis", "redis_url": faults_redis.url}
    data["jobs"] = {"lease_s": LEASE_S, "reap_interval_s": REAP_INTERVAL_S, "outage_after_s": OUTAGE_AFTER_S,
                    "notify_lease_s": NOTIFY_LEASE_S}
    data["webhooks"] = WEBHOOKS
    data.setdefault("media", {})["allow_networks"] = ["127.0.0.1/32"]  # the tests' webhook receiver
    return parse_config(data, CONFIGS, env={})


class Receiver:
    """A webhook receiver on 127.0.0.1: counts the acknowledged deliveries per job id (fal's `request_id`,
    Eachlabs' `exec_id`). With `refuse_first`, each job's first attempt is answered 503, so its delivery waits to
    retry (a replica that dies then takes it along)."""

    def __init__(self):
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.acked: Counter = Counter()
        self.refused: Counter = Counter()
        self.refuse_first = False
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                job_id = payload.get("request_id") or payload.get("exec_id") or "?"
                with receiver._lock:
                    refuse = receiver.refuse_first and not receiver.refused[job_id]
                    (receiver.refused if refuse else receiver.acked)[job_id] += 1
                self.send_response(503 if refuse else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def delivered(self, job_ids) -> dict[str, int]:
        with self._lock:
            return {job_id: self.acked[job_id] for job_id in job_ids}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="session")
def receiver():
    rx = Receiver()
    yield rx
    rx.close()


@pytest.fixture(scope="package")
def stack(faults_config, faults_redis):
    """Base URL of the running fault stack; Serve and Ray are shut down when its tests end."""
    try:
        with running_stack(faults_config) as base:
            yield base
    finally:
        if faults_redis.paused:  # a failed test left it frozen: Serve's teardown would wait on it
            faults_redis.resume()
