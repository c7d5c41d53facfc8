"""Shared test set-up. Tests are marked by folder: tests/integration/* need the live stack."""

from __future__ import annotations

import base64
import io
import os
import socket
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
