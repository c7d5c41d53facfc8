"""A local llava-serve (`llava-serve run`), and a private redis-server, for the load test, the benchmark and
the tests, started and stopped by them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s")


@contextlib.contextmanager
def process(cmd: list[str], ready_url: str, what: str, env: dict | None = None, timeout: float = 240, log=None):
    """Run a server until the block ends (SIGINT, then SIGKILL after 60 s); yields once `ready_url` answers 200."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(ready_url, proc, timeout, what)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def llava_serve(config: Path, port: int, keys_file: Path | None = None, log=None, env: dict | None = None):
    """`llava-serve run CONFIG` on 127.0.0.1:PORT, with `env` added to its environment; yields its base URL
    once /readyz says the engine runs."""
    env = {**(env or {}), "PORT": str(port), "RAY_USAGE_STATS_ENABLED": "0"}
    if keys_file:
        env["LLAVA_SERVE_KEYS_FILE"] = str(keys_file)
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "llava-serve"), "run", str(config)]
    with process(cmd, f"{url}/readyz", "llava-serve", env=env, log=log):
        yield url


@contextlib.contextmanager
def redis_server(workdir: Path):
    """A private redis-server on a free port of 127.0.0.1, no persistence (never the system's own on 6379);
    yields its URL once it answers PING, and stops it when the block ends."""
    import shutil

    import redis

    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (`make install` installs it)")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
        stdin=subprocess.DEVNULL,
    )
    try:
        client, deadline = redis.Redis(host="127.0.0.1", port=port), time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {workdir / 'redis.log'}") from None
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
