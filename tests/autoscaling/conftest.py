"""The autoscaling stack: configs/local-autoscale.yaml (the embedded stack, the engine allowed 1-2 replicas) on the
tiny model, with delays of seconds, and a runner that claims few jobs at a time, so a backlog stays in the job
store where only the engine's queue-aware policy sees it (docs/autoscaling.md)."""

from __future__ import annotations

import pytest
import yaml

from serve.config import ServeConfig, parse_config
from tests.conftest import CONFIGS, free_port, running_stack

KEY = "autoscale-key-1"
KEYS = [{"key": KEY, "name": "autoscale", "rate_per_minute": 100_000, "max_concurrent": 100}]
# Serve sees at most this many of the runner's requests: below one replica's target, so without the store's
# backlog Serve's own policy would never add a replica.
RUNNER_MAX_PARALLEL = 4
TARGET = 8
# Serve's handles and replicas report their requests every 10 s (its metrics_interval_s): a shorter look-back
# than that sees nothing new.
SCALING = {"upscale_delay_s": 2, "downscale_delay_s": 5, "look_back_period_s": 12}


def autoscale_data(model_dir, keys_dir) -> dict:
    data = yaml.safe_load((CONFIGS / "local-autoscale.yaml").read_text())
    keys_file = keys_dir / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(KEYS))
    data["model"]["source"] = str(model_dir)
    data["http"]["port"] = free_port()
    data["auth"]["keys_file"] = str(keys_file)
    data["engine_deployment"]["queue_poll_s"] = 0.5
    data["engine_deployment"]["autoscaling"].update(target_ongoing_requests=TARGET, **SCALING)
    data["jobs"] = {"runner_max_parallel": RUNNER_MAX_PARALLEL, "reap_interval_s": 0.5}
    return data


@pytest.fixture(scope="package")
def scaling_data(tiny_model_dir, tmp_path_factory) -> dict:
    return autoscale_data(tiny_model_dir, tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="package")
def scaling_stack(scaling_data):
    """Base URL of the running stack (1-2 engine replicas); Serve and Ray are shut down when its tests end."""
    cfg: ServeConfig = parse_config(scaling_data, CONFIGS, env={})
    with running_stack(cfg) as base:
        yield base
