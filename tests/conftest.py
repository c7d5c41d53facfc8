"""Shared test set-up. Tests are marked by folder: tests/integration/* need the live stack."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
LOCAL_KEY = "local-test-key"  # from configs/keys.local.yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from serve.engine.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llava"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_bytes(size=(64, 48), fmt="PNG", color=(200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def data_uri(size=(64, 48), fmt="PNG", color=(200, 30, 60)) -> str:
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(image_bytes(size, fmt, color)).decode()


class Clock:
    """An injectable clock for the job store: time moves only when a test says so."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Receiver:
    """A local webhook endpoint answering with the given statuses in turn (the last one repeats)."""

    def __init__(self, statuses, delay=0.0):
        self.calls: list[tuple[dict, dict]] = []
        receiver, lock = self, threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:  # concurrent deliveries: each call gets its own place in `statuses`
                    receiver.calls.append((body, dict(self.headers)))
                    status = statuses[min(len(receiver.calls), len(statuses)) - 1]
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def close(self):
        self._server.shutdown()
