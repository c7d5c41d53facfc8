"""The live stack — local Ray + Serve + vLLM CPU + the tiny model — started once per session."""

from __future__ import annotations

import time

import pytest
import requests
import yaml
from ray import serve

from serve.app import ENGINE_DEPLOYMENT, start_local, stop_local
from serve.config import ServeConfig, parse_config
from serve.engine.tiny_model import build_tiny_model
from tests.conftest import CONFIGS, free_port


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def stack_config(tiny_model_dir) -> ServeConfig:
    data = yaml.safe_load((CONFIGS / "local-cpu.yaml").read_text())
    data["model"]["source"] = str(tiny_model_dir)
    data["http"]["port"] = free_port()
    # The tests' own image server runs on 127.0.0.1; every other non-public address stays refused.
    data["media"]["allow_networks"] = ["127.0.0.1/32"]
    return parse_config(data, CONFIGS, env={})


@pytest.fixture(scope="package")
def stack(stack_config):
    """Base URL of the running stack; Serve and Ray are shut down when the integration tests end."""
    try:
        start_local(stack_config)
        base = f"http://{stack_config.http.host}:{stack_config.http.port}"
        assert requests.get(f"{base}/readyz", timeout=30).status_code == 200
        yield base
    finally:
        stop_local()


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
