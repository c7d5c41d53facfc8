"""Autoscaling seen to act on the real stack (docs/autoscaling.md), printing the engine's replicas over time.

1 -> 2 -> 1: a backlog of queue jobs, which Serve cannot see (the runner sends it at most 4 requests, below one
replica's target of 8), brings a second engine replica up; idle, it goes again, and the jobs running on it
when it stops finish there (drain): every job succeeds on its first attempt.

0 -> 1 -> 0: the same engine allowed to rest at 0 stays there although the ingress holds its handle; queue jobs
submitted meanwhile read as queued until a replica, started for them, runs them; then it rests again. A sync
request at rest waits its bound and is answered 503 with Retry-After, and a client that retries is served.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from ray import serve

from serve.api.fal.protocol import MAX_NEW_TOKENS
from serve.app import build_app
from serve.config import parse_config
from serve.deployment import ENGINE_DEPLOYMENT
from serve.jobs.factory import build_store
from tests.autoscaling.conftest import KEY, KEYS, TARGET
from tests.conftest import CONFIGS, data_uri

APP = "/fal-ai/llavav15-13b"
FAL = {"Authorization": f"Key {KEY}"}
EACH = {"X-API-Key": KEY}
IMAGE = data_uri()
OWNER = KEYS[0]["name"]
JOB_S = 10.0  # how long each job of the backlog generates: the last ones are still running at the scale-in
TITLE = f"ServeReplica:llava:{ENGINE_DEPLOYMENT}".encode()


def engine_states() -> dict[str, int]:
    app = serve.status().applications.get("llava")
    deployment = app.deployments.get(ENGINE_DEPLOYMENT) if app else None
    return {state: n for state, n in (deployment.replica_states if deployment else {}).items() if n}


def engine_processes() -> int:
    """Engine replicas by their process title (what operators and the fault tests look for)."""
    from pathlib import Path

    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if TITLE in (entry / "cmdline").read_bytes():
                    found[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return sum(1 for parent in found.values() if parent not in found)  # not the processes a replica forked


class Timeline(threading.Thread):
    """Samples the engine's replica states (and, with a store, its running jobs) every half second."""

    def __init__(self, store=None):
        super().__init__(daemon=True)
        self.start_at, self.samples, self.store = time.monotonic(), [], store
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(0.5):
            try:
                states = engine_states()
                running_jobs = asyncio.run(self.store.counts())["running"] if self.store is not None else None
            except Exception:  # the controller busy with a redeploy: the next sample tells
                continue
            self.samples.append((time.monotonic() - self.start_at, states, running_jobs))

    def wait(self, check, timeout_s: float) -> float | None:
        """Seconds (since the timeline began) until `check(states)` held, or None after `timeout_s`."""
        deadline, seen = time.monotonic() + timeout_s, len(self.samples)
        while time.monotonic() < deadline:
            if len(self.samples) > seen and check(self.samples[-1][1]):  # a sample taken since the call
                return self.samples[-1][0]
            time.sleep(0.25)
        return None

    def stop(self) -> str:
        self._stop_event.set()
        changes, last = [], None
        for t, states, running_jobs in self.samples:
            if states != last:
                jobs = "" if running_jobs is None else f"  ({running_jobs} job(s) running)"
                changes.append(f"{t:6.1f} s  {states}{jobs}")
                last = states
        return "\n".join(changes)


def submit_fal(base: str, tokens: int) -> str:
    body = {"prompt": "Describe the picture.", "image_url": IMAGE, "max_new_tokens": tokens, "temperature": 0}
    resp = requests.post(f"{base}/queue{APP}", json=body, headers=FAL, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["request_id"]


def fal_status(base: str, job_id: str) -> dict:
    return requests.get(f"{base}{APP}/requests/{job_id}/status", headers=FAL, timeout=30).json()


def wait_jobs(store, ids: list[str], timeout_s: float) -> dict:
    """Each job's record once every one has ended (or as it stands at the timeout)."""
    async def read():
        return {job_id: await store.get(job_id, OWNER) for job_id in ids}

    deadline = time.monotonic() + timeout_s
    while True:
        jobs = asyncio.run(read())
        if all(job.status.terminal for job in jobs.values()) or time.monotonic() > deadline:
            return jobs
        time.sleep(1)


def calibrate(base: str) -> int:
    """max_new_tokens for a job of about JOB_S seconds on this machine, from one timed sync request."""
    started = time.monotonic()
    resp = requests.post(f"{base}{APP}", json={"prompt": "Hi", "image_url": IMAGE, "max_new_tokens": 128},
                         headers=FAL, timeout=120)
    assert resp.status_code == 200, resp.text
    per_token = (time.monotonic() - started) / 128
    return max(64, min(MAX_NEW_TOKENS, int(JOB_S / per_token)))  # fal's bound: a fast machine's jobs are shorter


def test_a_backlog_in_the_store_scales_the_engine_out_and_idleness_back_in(scaling_stack, scaling_data, report_cost):
    cfg = parse_config(scaling_data, CONFIGS, env={})
    store = build_store(cfg)
    began = time.monotonic()
    timeline = Timeline(build_store(cfg))  # its own client: it reads from another thread
    timeline.start()
    tokens = None
    try:
        assert timeline.wait(lambda s: s == {"RUNNING": 1}, 60) is not None
        tokens = calibrate(scaling_stack)
        submitted = time.monotonic() - timeline.start_at
        # A backlog that lasts: topped up while the second replica starts (a start takes minutes on two busy
        # cores), then left to drain.
        ids, up = [], None
        with ThreadPoolExecutor(8) as pool:
            while up is None and time.monotonic() - timeline.start_at - submitted < 240 and len(ids) < 200:
                if asyncio.run(store.startable()) < 2 * TARGET:
                    ids += pool.map(lambda _: submit_fal(scaling_stack, tokens), range(TARGET))
                up = timeline.wait(lambda s: s.get("RUNNING", 0) == 2, 2)
        assert up is not None, "no second engine replica within 4 minutes of a backlog"
        assert engine_processes() == 2  # each a Serve replica process, titled as operators expect
        jobs = wait_jobs(store, ids, 600)
        idle = time.monotonic() - timeline.start_at
        down = timeline.wait(lambda s: s == {"RUNNING": 1}, 600)
        assert down is not None, "the second engine replica did not go within 10 minutes of idleness"
        # When the scale-in began (a replica stopping), jobs were still running: they must finish where they ran.
        stopping, _, running_then = next(sample for sample in timeline.samples if sample[1].get("STOPPING"))
    finally:
        changes = timeline.stop()
        print(f"\nengine replicas over time ({tokens} tokens per job):\n{changes}")
    assert {job.status.value for job in jobs.values()} == {"succeeded"}, {j: job.status for j, job in jobs.items()}
    assert all(job.attempts == 1 for job in jobs.values())  # none re-run: a replica stopping drained its jobs
    assert running_then, "no job was running when the replica began to stop: the drain was not exercised"
    report_cost(f"autoscaling 1->2->1: a backlog ({len(ids)} jobs in all) from {submitted:.0f} s, 2 replicas at "
                f"{up:.0f} s, idle at {idle:.0f} s, scale-in began at {stopping:.0f} s with {running_then} job(s) "
                f"still running, 1 replica at {down:.0f} s; {time.monotonic() - began:.0f} s in all")


def test_a_resting_engine_stays_at_zero_and_queued_work_wakes_it(scaling_stack, scaling_data, report_cost):
    data = copy.deepcopy(scaling_data)
    data["engine_deployment"]["autoscaling"].update(min_replicas=0, downscale_to_zero_delay_s=5)
    data["engine_deployment"]["cold_start_wait_s"] = 3
    cfg = parse_config(data, CONFIGS, env={})
    store = build_store(cfg)
    began = time.monotonic()
    timeline = Timeline()
    timeline.start()
    try:
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
        rest = timeline.wait(lambda s: s == {}, 180)
        assert rest is not None, "the engine did not come to rest"
        # At rest it stays there, though the ingress holds the engine's handle and is probed.
        for _ in range(10):
            assert requests.get(f"{scaling_stack}/readyz", timeout=10).status_code == 200
            time.sleep(1)
        assert engine_states() == {} and engine_processes() == 0

        # Queued work waits as queued, and brings a replica up.
        fal_id = submit_fal(scaling_stack, 16)
        body = {"model": "llava-13b", "input": {"image": IMAGE, "prompt": "Describe.", "max_tokens": 16}}
        each = requests.post(f"{scaling_stack}/v1/prediction/", json=body, headers=EACH, timeout=30)
        assert each.status_code == 200, each.text
        each_id = each.json()["predictionID"]
        queued = fal_status(scaling_stack, fal_id)
        assert (queued["status"], queued["queue_position"]) in {("IN_QUEUE", 0), ("IN_QUEUE", 1)}, queued
        each_read = requests.get(f"{scaling_stack}/v1/prediction/{each_id}", headers=EACH, timeout=30).json()
        assert each_read["status"] == "created", each_read  # Eachlabs' word for queued
        woke = timeline.wait(lambda s: s.get("RUNNING", 0) == 1, 180)
        assert woke is not None, "queued jobs did not bring an engine replica up"
        jobs = wait_jobs(store, [fal_id, each_id], 120)
        assert {job.status.value for job in jobs.values()} == {"succeeded"} and all(
            job.attempts == 1 for job in jobs.values())
        rested = timeline.wait(lambda s: s == {}, 180)
        assert rested is not None, "the engine did not rest again"

        # A sync request at rest: the bound, then 503 with Retry-After in fal's shape; its call woke the engine,
        # and a client retrying as told is served.
        sync = {"prompt": "Hi", "image_url": IMAGE, "max_new_tokens": 4}
        started = time.monotonic()
        refused = requests.post(f"{scaling_stack}{APP}", json=sync, headers=FAL, timeout=60)
        waited = time.monotonic() - started
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "3", refused.text
        assert refused.headers["x-fal-error-type"] == "runner_disconnected" and "detail" in refused.json()
        assert waited >= 3
        for attempt in range(1, 61):
            time.sleep(int(refused.headers["Retry-After"]))
            served = requests.post(f"{scaling_stack}{APP}", json=sync, headers=FAL, timeout=60)
            if served.status_code != 503:
                break
        assert served.status_code == 200 and served.json()["stats"]["num_output_tokens"] == 4, served.text
    finally:
        changes = timeline.stop()
        print(f"\nengine replicas over time:\n{changes}")
    report_cost(f"autoscaling 0->1->0: at rest at {rest:.0f} s, queued jobs woke it at {woke:.0f} s, rested "
                f"again at {rested:.0f} s, a sync request at rest 503 after {waited:.1f} s and served on retry "
                f"{attempt}; {time.monotonic() - began:.0f} s in all")

