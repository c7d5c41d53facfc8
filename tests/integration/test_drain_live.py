"""Graceful drain on the live stack: when Serve stops an ingress replica, what it is doing finishes.

A sync generation in flight is an ongoing request: Serve waits for it before it tears the replica down.
A running job is not a request: the runner's drain (in the ASGI lifespan's shutdown, which Serve runs after
the HTTP drain) lets it finish, so it is recorded once, by the replica that ran it, not re-run elsewhere.

Both tests make Serve stop every replica of the shared stack and put the same application back before they
end (2 ingress replicas, the same options, all RUNNING), so the tests after them see the stack as it was.
An imperative `serve.run` carries no code version, so Serve treats every redeploy as new code and replaces
every replica, the engine's included: re-running the session's own application is a real redeploy.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import requests
from ray import serve

from serve.app import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, build_app
from serve.jobs.models import JobStatus
from tests.conftest import LOCAL_KEY, data_uri
from tests.integration.conftest import replica_of

APP = "fal-ai/llavav15-13b"
AUTH = {"Authorization": f"Key {LOCAL_KEY}"}
TOKENS = 2000  # the tiny model emits exactly this many, at 250-1,000 a second: seconds of work


def body(n=TOKENS):
    return {"prompt": "Describe", "image_url": data_uri(), "max_new_tokens": n, "temperature": 0}


def generate(base):
    return requests.post(f"{base}/{APP}", json=body(), headers=AUTH, timeout=180)


def ingress_replicas(app_name) -> set[str]:
    """Names of the live ingress replica actors (a job's `runner` is one of them)."""
    prefix = f"SERVE_REPLICA::{app_name}#{INGRESS_DEPLOYMENT}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)}


def ongoing(replica: str) -> int:
    """In-flight requests of one replica: what its graceful shutdown waits for."""
    return ray.get(ray.get_actor(replica, namespace="serve").get_num_ongoing_requests.remote(), timeout=10)


def replica_states(app_name, deployment) -> dict[str, int]:
    app = serve.status().applications.get(app_name)
    if app is None or deployment not in app.deployments:
        return {}
    return {str(k): v for k, v in app.deployments[deployment].replica_states.items() if v}


def serving(base, app_name) -> bool:
    app = serve.status().applications.get(app_name)
    if app is None or app.status != "RUNNING":
        return False
    if replica_states(app_name, INGRESS_DEPLOYMENT) != {"RUNNING": 2}:
        return False
    if replica_states(app_name, ENGINE_DEPLOYMENT) != {"RUNNING": 1}:
        return False
    try:
        return requests.get(f"{base}/readyz", timeout=10).status_code == 200
    except requests.RequestException:
        return False


def wait_serving(base, app_name, timeout=240.0) -> None:
    """Until the application runs as the session started it: both ingress replicas and the engine RUNNING
    (nothing still starting or stopping) and the engine answering."""
    deadline = time.monotonic() + timeout
    while not serving(base, app_name):
        assert time.monotonic() < deadline, serve.status().applications.get(app_name)
        time.sleep(0.5)


def redeploy(cfg) -> None:
    """The session's own application, deployed again (blocks until Serve reports it RUNNING)."""
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")


@pytest.fixture
def serving_stack(stack, stack_config):
    """The stack with both ingress replicas serving before the test, and put back after it."""
    wait_serving(stack, stack_config.app_name)
    yield stack
    if stack_config.app_name not in serve.status().applications:  # the test failed with the app deleted
        redeploy(stack_config)
    wait_serving(stack, stack_config.app_name)


def redeploy_retrying(cfg, failed: list[str]) -> None:
    """`redeploy`, tried again after a ValueError from `serve.run`. Twice in CI, never in a developer's run of the
    same tests, `serve.run` called here (from a worker thread, while this test polls `serve.status()`) raised
    one and the old replicas still ran 240 s later: nothing had been replaced. Each such failure is kept,
    traceback and all, and printed in the run's summary, until its cause is known."""
    for _ in range(3):
        try:
            return redeploy(cfg)
        except ValueError as exc:
            failed.append("".join(traceback.format_exception(exc)))
    raise AssertionError("serve.run failed three times:\n" + "\n".join(failed))


def test_a_redeploy_lets_in_flight_sync_generations_finish(serving_stack, stack_config, report_cost):
    app = stack_config.app_name
    old = ingress_replicas(app)
    assert len(old) == 2
    with ThreadPoolExecutor(12) as pool:
        # Generations are kept in flight (a fast machine ends one in about 2 s) until every old replica has one,
        # then through the redeploy until Serve is seen stopping a replica. How many that takes depends on the
        # machine (a redeploy restarts the engine too, and a fast machine runs through some 1.5 calls a
        # second meanwhile), so only time bounds it.
        calls, deploying, in_flight_at_stop, failed = [], None, None, []
        deadline = time.monotonic() + 240
        while in_flight_at_stop is None:
            assert time.monotonic() < deadline, (len(calls), deploying, {r: ongoing(r) for r in old})
            if sum(not c.done() for c in calls) < 3:
                calls.append(pool.submit(generate, serving_stack))
            if deploying is None and all(ongoing(r) >= 1 for r in old):
                deploying = pool.submit(redeploy_retrying, stack_config, failed)
            if deploying is not None and deploying.done():
                deploying.result()  # a redeploy that failed says why, instead of a wait that runs out
            if deploying is not None and replica_states(app, INGRESS_DEPLOYMENT).get("STOPPING"):
                in_flight_at_stop = sum(not c.done() for c in calls)
            time.sleep(0.05)
        answers = [c.result() for c in calls]
        deploying.result(timeout=300)
    for failure in failed:
        report_cost(f"drain redeploy: serve.run raised, tried again: {failure}")

    # Serve stopped a replica while generations were in flight, and every one still answered in full.
    assert in_flight_at_stop >= 1
    for resp in answers:
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert got["partial"] is False and got["stats"]["num_output_tokens"] == TOKENS
        assert len(got["output"]) == TOKENS
    wait_serving(serving_stack, app)
    assert not ingress_replicas(app) & old  # the redeploy replaced both


def test_a_replica_stopped_during_a_job_finishes_it_instead_of_leaving_it_to_be_re_run(
    serving_stack, stack_config, job_store
):
    app = stack_config.app_name
    submitted = requests.post(f"{serving_stack}/queue/{APP}", json=body(), headers=AUTH, timeout=30)
    assert submitted.status_code == 200, submitted.text
    rid = submitted.json()["request_id"]
    status_url = f"{serving_stack}/queue/{APP}/requests/{rid}/status"
    deadline = time.monotonic() + 30
    while (status := requests.get(status_url, headers=AUTH, timeout=10).json())["status"] != "IN_PROGRESS":
        assert status["status"] == "IN_QUEUE" and time.monotonic() < deadline, status
        time.sleep(0.05)
    running = asyncio.run(job_store.get(rid, "local-dev"))
    assert running.status == JobStatus.RUNNING and replica_of(running) in ingress_replicas(app)
    time.sleep(0.3)  # into its generation, which a fast machine ends in about 2 s

    # Every replica is stopped at once (the runner's among them): the job is mid-generation.
    stop_at = time.time()
    with ThreadPoolExecutor(1) as pool:
        deleting = pool.submit(serve.delete, app)
        deadline = time.monotonic() + 60
        while (job := asyncio.run(job_store.get(rid, "local-dev"))).status == JobStatus.RUNNING:
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        deleting.result(timeout=120)
    assert replica_of(running) not in ingress_replicas(app)  # that replica is gone

    # Finished after Serve stopped the replica running it, and run once: by that replica (a recorded
    # outcome needs the lease of the runner that claimed it; a re-run would be a second attempt).
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 1 and job.finished_at > stop_at
    assert job.result.num_output_tokens == TOKENS
    assert "Worker lost; re-queued." not in [line.message for line in job.logs]

    redeploy(stack_config)
    wait_serving(serving_stack, app)
    done = requests.get(status_url, headers=AUTH, timeout=10)
    assert done.status_code == 200 and done.json()["status"] == "COMPLETED", done.text
    result = requests.get(f"{serving_stack}/queue/{APP}/requests/{rid}", headers=AUTH, timeout=10)
    assert result.status_code == 200, result.text
    assert result.json()["stats"]["num_output_tokens"] == TOKENS and len(result.json()["output"]) == TOKENS
