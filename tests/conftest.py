"""Shared test set-up. Tests are marked by folder (TEST_KINDS): tests/integration/* need the live stack."""

from __future__ import annotations

import base64
import contextlib
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


# Every test carries its folder's marker (tests/<kind>/test_*.py), so `pytest -m unit`, `-m "not integration"`
# and the like select by kind. No folder of tests falls out of the run silently: a test file in a folder of
# no known kind stops the collection, and so does, on a plain `pytest`, a folder of tests that `testpaths`
# lacks. A new kind goes here, into pyproject's `markers` and into its `testpaths`
# (tests/unit/test_markers.py checks the three agree with the folders).
TEST_KINDS = ("unit", "deploy", "integration", "tls", "faults", "autoscaling", "image", "multinode", "gpu",
              "hostile")
TESTS = Path(__file__).resolve().parent


def is_test_file(name: str) -> bool:  # pytest's default python_files
    return name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))


def folders_with_tests() -> set[str]:
    """The folders under tests/ that hold a test file at any depth, as `tests/<folder>`."""
    found = set()
    for top in (d for d in TESTS.iterdir() if d.is_dir()):
        for _, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d not in ("node_modules", "__pycache__")]
            if any(is_test_file(f) for f in files):
                found.add(f"tests/{top.name}")
                break
    return found


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(config, items):
    problems = set()
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        problems |= {f"{f} is not in testpaths" for f in folders_with_tests() - set(config.getini("testpaths"))}
        problems |= {f"tests/{f.name} is not in a folder" for f in TESTS.iterdir() if f.is_file() and is_test_file(f.name)}
    for item in items:
        try:
            parts = Path(item.path).resolve().relative_to(TESTS).parts
        except ValueError:
            continue  # not under tests/
        kind = parts[0] if len(parts) > 1 else None
        if kind in TEST_KINDS:
            item.add_marker(getattr(pytest.mark, kind))
        else:
            problems.add(f"tests/{parts[0]} is a folder of no known kind" if kind else f"tests/{parts[0]} is not in a folder")
    if problems:
        raise pytest.UsageError(
            f"{'; '.join(sorted(problems))}. A test lives in tests/<kind>/, kind one of {', '.join(TEST_KINDS)}; "
            "a new kind goes into TEST_KINDS (tests/conftest.py), pyproject's markers and testpaths."
        )


# What each kind of test costs (set-up and teardown included: a live stack's start is its folder's), and the
# figures tests report through the `report_cost` fixture (an image's build time and size, say): printed at the
# end of every run, so CI's output shows where the minutes go.
_SECONDS: dict[str, float] = {}
_COSTS: list[str] = []


@pytest.fixture(scope="session")
def report_cost():
    """Call it with a line to print in the run's summary (a fixture: pytest's conftest module is not the one
    `import tests.conftest` gives)."""
    return _COSTS.append


def pytest_runtest_logreport(report):
    kind = Path(report.fspath).parts[1] if report.fspath.startswith("tests/") else "other"
    _SECONDS[kind] = _SECONDS.get(kind, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if _SECONDS:
        spent = ", ".join(f"{kind} {seconds:.0f} s" for kind, seconds in sorted(_SECONDS.items()))
        terminalreporter.write_line(f"time by kind of test: {spent}")
    for line in _COSTS:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from serve.engine.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llava"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_stack_data(model_dir: Path, keys: list[dict], keys_dir: Path) -> dict:
    """The embedded default's config (configs/local-cpu.yaml) as data, on the tiny model, a free port and a keys
    file of `keys` written in `keys_dir`: what each live suite starts from and then changes."""
    import yaml

    keys_file = keys_dir / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(keys))
    data = yaml.safe_load((CONFIGS / "local-cpu.yaml").read_text())
    data["model"]["source"] = str(model_dir)
    data["http"]["port"] = free_port()
    data["auth"]["keys_file"] = str(keys_file)
    return data


@contextlib.contextmanager
def running_stack(cfg):
    """A live local stack on `cfg` (Ray, Serve, vLLM): its base URL once ready; Ray is shut down at the end.
    One local stack at a time: another folder's may still be up (a package fixture of a folder without
    __init__.py lasts to the session's end), and its tests are done, so it is stopped first (idempotent)."""
    import requests

    from serve.app import start_local, stop_local

    stop_local()
    try:
        start_local(cfg)
        base = f"http://{cfg.http.host}:{cfg.http.port}"
        assert requests.get(f"{base}/readyz", timeout=30).status_code == 200
        yield base
    finally:
        stop_local()


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
