"""The hostile-tenant stack: local Ray + Serve + vLLM CPU + the tiny model, with the Redis store (as in
production) and bounds small enough to reach in a test. One key abuses a bound while another keeps
working; docs/bounds.md says what each bound is."""

from __future__ import annotations

import sys

import pytest

from serve.config import ServeConfig, parse_config
from tests.conftest import CONFIGS, ROOT, local_stack_data, running_stack

sys.path.insert(0, str(ROOT / "loadtest"))
import stack as loadtest_stack  # noqa: E402

ABUSER_KEY, VICTIM_KEY, FUZZ_KEY = "hostile-abuser-key-1", "hostile-victim-key-1", "hostile-fuzz-key-1"
REVOKED_KEY = "hostile-revoked-key-1"  # removed from the keys file while the stack runs
ABUSER_CONCURRENT = 2
KEYS = [
    {"key": ABUSER_KEY, "name": "hostile-abuser", "rate_per_minute": 600, "max_concurrent": ABUSER_CONCURRENT},
    {"key": VICTIM_KEY, "name": "hostile-victim", "rate_per_minute": 600, "max_concurrent": 4},
    {"key": FUZZ_KEY, "name": "hostile-fuzz", "rate_per_minute": 100_000, "max_concurrent": 16},
    {"key": REVOKED_KEY, "name": "hostile-revoked"},
]
KEYS_RELOAD_S = 1.0


@pytest.fixture(scope="session")
def hostile_redis_url(tmp_path_factory):
    with loadtest_stack.redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def hostile_config(tiny_model_dir, tmp_path_factory, hostile_redis_url) -> ServeConfig:
    data = local_stack_data(tiny_model_dir, KEYS, tmp_path_factory.mktemp("keys"))
    data["auth"]["reload_interval_s"] = KEYS_RELOAD_S
    data["telemetry"]["metrics_route"] = False  # as in production: no key names on the API port
    data["store"] = {"backend": "redis", "redis_url": hostile_redis_url}
    data["jobs"] = {"lease_s": 3.0, "reap_interval_s": 0.5, "outage_after_s": 1.5}
    data["media"]["allow_networks"] = ["127.0.0.1/32"]
    # Bounds small enough to reach in a test (production defaults: docs/configuration.md).
    data["media"]["max_image_bytes"] = 2 * 2**20
    data["http"]["max_body_bytes"] = 3 * 2**20
    data["limits"] = {"max_pending": 8, "max_stored_bytes": 4 * 2**20}
    data["reads"] = {"per_second": 20, "burst": 40, "max_status_streams": 3}
    data["webhooks"] = {"attempts": 1, "timeout_s": 3.0}
    return parse_config(data, CONFIGS, env={})


@pytest.fixture(scope="package")
def stack(hostile_config):
    """Base URL of the running hostile-tenant stack; Serve and Ray are shut down when its tests end."""
    with running_stack(hostile_config) as base:
        yield base
