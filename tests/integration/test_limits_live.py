"""Exact per-key limits across two ingress replicas, through real HTTP and the shared store."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from ray import serve

from serve.app import INGRESS_DEPLOYMENT
from tests.conftest import data_uri
from tests.integration.conftest import CONC_KEY, CONC_LIMIT, RATE_KEY, RATE_LIMIT

URL = "/fal-ai/llavav15-13b"


def burst(stack, key, n, max_new_tokens):
    body = {"prompt": "hi", "image_url": data_uri(), "max_new_tokens": max_new_tokens, "temperature": 0}

    def one(_):
        return requests.post(f"{stack}{URL}", json=body, headers={"Authorization": f"Key {key}"}, timeout=120)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def running_ingress_replicas(app_name):
    return serve.status().applications[app_name].deployments[INGRESS_DEPLOYMENT].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module", autouse=True)
def both_ingress_replicas(stack, stack_config):
    """Exactness is only proven across replicas if both serve: another test may have just killed one
    (test_jobs_live), and Serve takes a few seconds to replace it."""
    deadline = time.monotonic() + 60
    while running_ingress_replicas(stack_config.app_name) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)


def test_two_ingress_replicas_are_serving(stack, stack_config):
    assert running_ingress_replicas(stack_config.app_name) == 2


def test_rate_limit_is_exact_across_replicas(stack):
    results = burst(stack, RATE_KEY, RATE_LIMIT + 15, max_new_tokens=1)
    codes = sorted(r.status_code for r in results)
    assert codes == [200] * RATE_LIMIT + [429] * 15
    refused = [r for r in results if r.status_code == 429]
    assert all(r.json()["detail"].startswith("Rate limit exceeded") for r in refused)
    assert all(1 <= int(r.headers["retry-after"]) <= 60 and r.headers["x-ratelimit-remaining"] == "0" for r in refused)
    remaining = sorted(int(r.headers["x-ratelimit-remaining"]) for r in results if r.status_code == 200)
    assert remaining == list(range(RATE_LIMIT))  # every admission saw the shared count


def test_concurrency_cap_is_exact_across_replicas(stack):
    # Long generations: all arrive while the first ones still hold their slots.
    results = burst(stack, CONC_KEY, CONC_LIMIT + 9, max_new_tokens=768)
    codes = sorted(r.status_code for r in results)
    assert codes == [200] * CONC_LIMIT + [429] * 9
    refused = [r for r in results if r.status_code == 429]
    assert all(r.json() == {"detail": "Concurrency limit exceeded. Please retry later."} for r in refused)
    assert all(int(r.headers["retry-after"]) >= 1 and r.headers["x-fal-request-id"] for r in refused)
    # The slots were given back: the key works again.
    assert burst(stack, CONC_KEY, CONC_LIMIT, max_new_tokens=1)[0].status_code == 200
