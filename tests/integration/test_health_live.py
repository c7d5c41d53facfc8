"""Readiness follows the engine: its replica dies -> /readyz 503 (liveness stays 200); Serve
replaces it -> /readyz 200 again and generations work. What Kubernetes probes rely on."""

from __future__ import annotations

import time

import ray
import requests

from serve.app import ENGINE_DEPLOYMENT
from tests.conftest import LOCAL_KEY, data_uri


def poll(url: str, want: int, timeout_s: float) -> list[int]:
    seen, deadline = [], time.monotonic() + timeout_s
    while True:
        code = requests.get(url, timeout=10).status_code
        seen.append(code)
        if code == want or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def test_readiness_follows_the_engine_replica(stack):
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["namespace"] == "serve" and f"#{ENGINE_DEPLOYMENT}#" in a["name"]]
    assert requests.get(f"{stack}/readyz", timeout=10).status_code == 200
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)  # the engine replica dies

    down = poll(f"{stack}/readyz", 503, timeout_s=60)
    assert down[-1] == 503, down
    assert requests.get(f"{stack}/healthz", timeout=10).status_code == 200  # the ingress itself is fine

    up = poll(f"{stack}/readyz", 200, timeout_s=240)  # Serve starts a new replica; vLLM loads again
    assert up[-1] == 200, up[-5:]
    answer = requests.post(f"{stack}/fal-ai/llavav15-13b", headers={"Authorization": f"Key {LOCAL_KEY}"},
                           json={"prompt": "hi", "image_url": data_uri(), "max_new_tokens": 3}, timeout=120)
    assert answer.status_code == 200 and answer.json()["stats"]["num_output_tokens"] == 3
