"""The RayService's layout as separate Ray nodes on one machine (tools/multinode.py; docs/kubernetes.md,
"Rehearsing the layout on one machine"): the manifest's node groups and the Serve config `render-k8s` writes,
with the model swapped for the tiny one.

- every replica runs on the node group that offers what it asks for, the head runs none, and every worker
  node's proxy serves the three APIs;
- an ingress node killed (-9, all its processes) under load: requests through the other node's proxy keep
  working, every accepted job ends well and readable by its owner (re-run only if it ran on the dead node),
  and the ingress is back to its replicas on the ingress nodes;
- an engine node drained as a pod's preStop drains it: Serve starts the engine elsewhere and stops the old
  replica gracefully: its generations finish there, none is re-run, none fails.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from serve.deployment import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT
from serve.jobs.factory import build_store
from tests.conftest import ROOT, data_uri

sys.path.insert(0, str(ROOT / "tools"))
import multinode  # noqa: E402

APP = "/fal-ai/llavav15-13b"
FAL_KEY, EACH_KEY, SYNC_KEY = "multinode-fal-key-1", "multinode-each-key-1", "multinode-sync-key-1"
KEYS = [
    {"key": FAL_KEY, "name": "multinode-fal", "rate_per_minute": 100_000, "max_concurrent": 16},
    {"key": EACH_KEY, "name": "multinode-each", "rate_per_minute": 100_000, "max_concurrent": 16},
    {"key": SYNC_KEY, "name": "multinode-sync", "rate_per_minute": 100_000, "max_concurrent": 16},
]
OWNER = {"fal": "multinode-fal", "eachlabs": "multinode-each"}
FAL = {"Authorization": f"Key {FAL_KEY}"}
EACH = {"X-API-Key": EACH_KEY}
SYNC = {"Authorization": f"Key {SYNC_KEY}"}
IMAGE = data_uri()
DRAIN_DEADLINE_S = 140  # the preStop hook's (k8s/rayservice.yaml)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir, report_cost):
    from serve.app import stop_local

    stop_local()  # another suite's in-process stack, if one is still up: this machine's cores go to the nodes
    keys = tmp_path_factory.mktemp("multinode") / "keys.yaml"
    keys.write_text(yaml.safe_dump(KEYS))
    cluster = multinode.Cluster(keys_file=keys, model_dir=tiny_model_dir)
    try:
        with cluster:
            report_cost(f"multinode: {len(cluster.nodes)} Ray nodes up in {cluster.timings['nodes up']:.0f} s, "
                        f"the application RUNNING {cluster.timings['deployed']:.0f} s after the start")
            yield cluster
    finally:
        left = cluster.leftovers()
        report_cost(f"multinode: torn down, processes left {len(left)}")
        assert not left, left


# -- the load ----------------------------------------------------------------------------------------------


def submit_fal(base: str, tokens: int) -> str:
    body = {"prompt": "Describe the picture.", "image_url": IMAGE, "max_new_tokens": tokens, "temperature": 0}
    resp = requests.post(f"{base}/queue{APP}", json=body, headers=FAL, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["request_id"]


def create_each(base: str, tokens: int) -> str:
    body = {"model": "llava-13b", "input": {"image": IMAGE, "prompt": "Describe the picture.", "max_tokens": tokens,
                                            "temperature": 0}}
    resp = requests.post(f"{base}/v1/prediction/", json=body, headers=EACH, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["predictionID"]


def outcome(base: str, api: str, rid: str) -> tuple[str, int | None] | None:
    """A job's end as its owner reads it: ("succeeded", tokens) or ("failed: ...", None); None while it runs."""
    if api == "fal":
        status = requests.get(f"{base}/queue{APP}/requests/{rid}/status", headers=FAL, timeout=30)
        assert status.status_code in (200, 202), status.text  # 202 while it waits or runs
        if status.json()["status"] != "COMPLETED":
            return None
        result = requests.get(f"{base}/queue{APP}/requests/{rid}", headers=FAL, timeout=30)
        if result.status_code != 200:
            return f"failed: {result.status_code} {result.text[:200]}", None
        return "succeeded", result.json()["stats"]["num_output_tokens"]
    got = requests.get(f"{base}/v1/prediction/{rid}", headers=EACH, timeout=30)
    assert got.status_code == 200, got.text
    status = got.json()["status"]
    if status == "success":
        return "succeeded", None  # Eachlabs' answer carries no token count
    return None if status not in ("error", "cancelled") else (f"failed: {got.json()['output']}", None)


def wait_until(what: str, check, timeout_s: float, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            assert got, f"{what}: not within {timeout_s:.0f} s"
            return got
        time.sleep(every_s)


def ended(base: str, jobs: dict[str, str], timeout_s: float) -> dict[str, tuple[str, int | None]]:
    """Every job's end, polled through `base` as clients poll."""
    ends: dict[str, tuple[str, int | None]] = {}

    def all_ended():
        for rid, api in jobs.items():
            if rid not in ends and (got := outcome(base, api, rid)) is not None:
                ends[rid] = got
        return len(ends) == len(jobs)

    wait_until("every job ended", all_ended, timeout_s)
    return ends


def records(cluster, jobs: dict[str, str]) -> dict:
    """Each job as the store keeps it (status, runner, attempts, times)."""
    jobs = dict(jobs)  # as it is now: a thread may be adding to it

    async def read():
        store = build_store(cluster.cfg)
        try:
            return {rid: await store.get(rid, OWNER[api]) for rid, api in jobs.items()}
        finally:
            await store.aclose()

    return asyncio.run(read())


def all_running(cluster, jobs: dict[str, str]) -> dict | None:
    """The jobs' records once every one runs."""
    got = records(cluster, jobs)
    return got if all(job is not None and job.status.value == "running" for job in got.values()) else None


def replica_of(job) -> str:
    """The Serve replica id whose runner holds `job` (runners claim as '<replica's full id>#<claim>')."""
    return job.runner.rsplit("#", 1)[0].rsplit("#", 1)[1]


class Loop:
    """Calls `call` over and over in threads until stop(), pausing `every_s` between calls: their results."""

    def __init__(self, call, threads: int = 1, every_s: float = 0.0):
        self.results: list = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(threads)
        self._futures = [self._pool.submit(self._work, call, every_s) for _ in range(threads)]

    def _work(self, call, every_s: float) -> None:
        while not self._stop.is_set():
            self.results.append(call())
            self._stop.wait(every_s)

    def stop(self) -> list:
        self._stop.set()
        for f in self._futures:
            f.result(timeout=300)  # a call's exception, raised here
        self._pool.shutdown()
        return self.results


def sync_run(base: str, tokens: int) -> tuple[float, str]:
    """A fal sync run: when it was sent, and "ok" or what came back instead."""
    sent = time.monotonic()
    body = {"prompt": "Describe the picture.", "image_url": IMAGE, "max_new_tokens": tokens, "temperature": 0}
    try:
        resp = requests.post(f"{base}{APP}", json=body, headers=SYNC, timeout=240)
    except requests.RequestException as exc:
        return sent, f"no answer: {type(exc).__name__}"
    ok = resp.status_code == 200 and resp.json()["stats"]["num_output_tokens"] == tokens
    return sent, "ok" if ok else f"{resp.status_code} {resp.text[:120]}"


# -- the tests ---------------------------------------------------------------------------------------------


def on(cluster, deployment: str) -> list[str]:
    """The nodes a deployment's RUNNING replicas run on."""
    return sorted(node for node, state in cluster.replicas().get(deployment, []) if state == "RUNNING")


def test_each_replica_runs_on_its_node_group_and_every_worker_proxy_serves(cluster, report_cost):
    started = time.monotonic()
    cfg = cluster.cfg
    placed = cluster.replicas()
    report_cost(f"multinode: replicas by node {placed}")
    assert not cluster.misplaced()
    assert on(cluster, ENGINE_DEPLOYMENT) == ["gpu-l40s-1"] * cfg.engine_deployment.autoscaling.min_replicas
    # Spread over the two ingress pods, so that losing one leaves a replica serving.
    assert on(cluster, INGRESS_DEPLOYMENT) == ["cpu-ingress-1", "cpu-ingress-2"]
    # The head (num-cpus 0) runs Serve's controller and its proxies (HAProxy's manager, Serve's fallback), no replica.
    assert set(cluster.actors_on(cluster.node("head"))) <= {"ServeController", "HAProxyManager", "ProxyActor"}
    for node in cluster.nodes:
        if node.group != "head":
            assert not cluster.api_problems(node, SYNC_KEY, EACH_KEY), node.name
    report_cost(f"multinode: placement and the three APIs through {len(cluster.nodes) - 1} proxies in "
                f"{time.monotonic() - started:.0f} s")


JOB_TOKENS, SYNC_TOKENS = 256, 64


def test_an_ingress_node_killed_under_load(cluster, report_cost):
    """kill -9 of every process of an ingress node with jobs running on it and sync runs in flight through the
    other node's proxy, then a node of the same group started again, as KubeRay restarts a pod: requests
    through the other proxy go on, the dead replica's jobs are re-run once their lease lapses, and the
    ingress is back to its replicas on the ingress nodes."""
    cfg = cluster.cfg
    jobs = {submit_fal(cluster.node("cpu-ingress-1").url, JOB_TOKENS): "fal" for _ in range(4)}
    jobs |= {create_each(cluster.node("cpu-ingress-2").url, JOB_TOKENS): "eachlabs" for _ in range(2)}
    running = wait_until("every job running", lambda: all_running(cluster, jobs), 60, every_s=0.2)
    # The node whose replica runs the most jobs dies; the sync runs go through the other one's proxy.
    replica_nodes = {r["replica_id"]: r["node"] for r in cluster.replica_details(INGRESS_DEPLOYMENT)}
    by_node = {name: {rid for rid, job in running.items() if replica_nodes[replica_of(job)] == name}
               for name in ("cpu-ingress-1", "cpu-ingress-2")}
    victim, survivor = (cluster.node(name) for name in sorted(by_node, key=lambda name: -len(by_node[name])))
    on_victim = by_node[victim.name]
    sync = Loop(lambda: sync_run(survivor.url, SYNC_TOKENS), threads=2)
    time.sleep(1)  # sync runs in flight at the kill
    raylet = cluster.raylet(victim)
    killed = cluster.kill_node(victim)
    killed_at = time.monotonic()
    time.sleep(5)
    back = cluster.restart_node(victim)
    back_s = time.monotonic() - killed_at
    runs = sync.stop()
    ends = ended(survivor.url, jobs, 120)
    ended_s = time.monotonic() - killed_at
    final = records(cluster, jobs)
    rerun = {rid for rid, job in final.items() if job.attempts > 1}
    wanted = cfg.ingress.autoscaling.min_replicas
    wait_until("the ingress replicas", lambda: len(on(cluster, INGRESS_DEPLOYMENT)) == wanted, 60)
    settled_s = time.monotonic() - killed_at
    proxies = serving(cluster, 60)
    # The kill takes a moment (every process stopped, then killed): a request sent then may meet a replica
    # whose socket still accepts. Every one sent a second later must be answered.
    after_kill = [r for r in runs if r[0] > killed_at + 1]
    report_cost(f"multinode ingress node kill: {len(jobs)} jobs ({len(on_victim)} running on the dead node), "
                f"all ended {ended_s:.0f} s after the kill: {dict(Counter(end[0] for end in ends.values()))}; "
                f"re-run {len(rerun)}")
    report_cost(f"multinode ingress node kill: sync runs {len(runs)} ({len(after_kill)} sent 1 s or more after "
                f"the kill), failed {[got for _, got in runs if got != 'ok']}")
    try:  # Serve runs no proxy on a node without replicas: the node back may hold none
        back_proxy = requests.get(f"{back.url}/-/healthz", timeout=10).status_code
    except requests.RequestException as exc:
        back_proxy = type(exc).__name__
    report_cost(f"multinode ingress node kill: the node back {back_s:.0f} s after it (its proxy: {back_proxy}), "
                f"the ingress replicas on {on(cluster, INGRESS_DEPLOYMENT)} at {settled_s:.0f} s; the three APIs "
                f"answered through {sorted(name for name, failed in proxies.items() if not failed)}")

    assert raylet in killed
    assert on_victim, "the kill must find jobs running on the node"
    assert all(end == ("succeeded", None if jobs[rid] == "eachlabs" else JOB_TOKENS) for rid, end in ends.items()), ends
    assert rerun <= on_victim and all(job.attempts <= 2 for job in final.values()), (rerun, on_victim)
    assert after_kill and all(got == "ok" for _, got in after_kill), after_kill
    assert not cluster.misplaced()
    # Serve runs a proxy only where replicas run (and on the head): those are the pods KubeRay finds ready.
    assert survivor.name in proxies and not any(proxies.values()), proxies


def serving(cluster, timeout_s: float) -> dict[str, list[str]]:
    """Until the proxy of every worker node that holds a replica answers the three APIs: what each answered."""
    deadline = time.monotonic() + timeout_s
    while True:
        placed = {node for reps in cluster.replicas().values() for node, state in reps if state == "RUNNING"}
        got = {n.name: cluster.api_problems(n, SYNC_KEY, EACH_KEY) for n in cluster.nodes
               if n.alive and n.group != "head" and n.name in placed}
        if not any(got.values()) or time.monotonic() > deadline:
            return got
        time.sleep(1)


# Jobs start every second all through the drain, and each must outlast the one-second margin `on_old` leaves
# before the stop: at the tiny model's fastest (about 1,000 tokens a second) 512 did not (CI: the last one
# on the old replica ended a second before it stopped). 2,000 are 2-8 s of work, under fal's 2,048; the
# backlog they leave takes longer to drain (CI: past 60 s), so the jobs' end is waited for up to 180 s.
DRAIN_TOKENS = 2000


def test_an_engine_node_drained_finishes_its_generations_first(cluster, report_cost):
    """`ray drain-node` of the engine's node (the preStop hook's command and deadline) under a steady load, with a
    second engine node up, as the autoscaler would add one. Serve starts the replacement there and stops the old
    replica gracefully once the replacement runs, or once the deadline less graceful_shutdown_timeout_s is reached
    (20 s in) if it does not run yet: the old replica's generations finish there, none is re-run, and what comes
    while no engine runs waits for the replacement."""
    old = cluster.node("gpu-l40s-1")
    spare = cluster.add_node("gpu-l40s")
    (old_replica,) = [r["replica_id"] for r in cluster.replica_details(ENGINE_DEPLOYMENT)]
    base = cluster.node(on(cluster, INGRESS_DEPLOYMENT)[0]).url
    jobs: dict[str, str] = {}
    submits = Loop(lambda: jobs.update({submit_fal(base, DRAIN_TOKENS): "fal"}), every_s=1.0)
    sync = Loop(lambda: sync_run(base, DRAIN_TOKENS), threads=2)
    wait_until("jobs running", lambda: sum(job.status.value == "running" for job in records(cluster, jobs).values()
                                            if job is not None) >= 2, 60, every_s=0.2)
    drained_at = time.time()
    cluster.drain_node(old, DRAIN_DEADLINE_S)
    seen = watch(cluster, old_replica, 240)
    submits.stop()
    runs = sync.stop()
    ends = ended(base, jobs, 180)  # DRAIN_TOKENS says why 180 s
    final = records(cluster, jobs)
    stopping = next(t for t, state, _ in seen if state in ("STOPPING", "gone"))
    replaced = next(t for t, _, others in seen if others)  # its replacement RUNNING
    gone = next(t for t, state, _ in seen if state == "gone")
    # Claimed a second before the old replica stopped or had a replacement: it was the only one to generate it.
    on_old = {rid: job for rid, job in final.items() if job.started_at < min(stopping, replaced) - 1}
    at_stop = {rid for rid, job in on_old.items() if job.finished_at > stopping}
    last_on_old = max((job.finished_at for job in on_old.values()), default=drained_at)
    since = lambda t: f"{t - drained_at:.0f} s"  # noqa: E731
    report_cost(f"multinode engine drain: the old replica {' -> '.join(s for _, s, _ in dedupe(seen))}; stopping at "
                f"{since(stopping)} with {len(at_stop)} of its {len(on_old)} jobs still generating, gone at "
                f"{since(gone)} (its last job ended at {since(last_on_old)}), its replacement running at "
                f"{since(replaced)}; the engine now on {on(cluster, ENGINE_DEPLOYMENT)}")
    report_cost(f"multinode engine drain: {len(jobs)} jobs {dict(Counter(end[0] for end in ends.values()))}, "
                f"{len(runs)} sync runs {dict(Counter(got for _, got in runs))}")

    assert at_stop, "the old replica must stop while it still generates"
    assert gone >= last_on_old, "the old replica left before its generations ended"
    assert all(end == ("succeeded", DRAIN_TOKENS) for end in ends.values()), ends
    assert all(job.attempts == 1 for job in final.values()), {rid: job.attempts for rid, job in final.items()}
    assert all(got == "ok" for _, got in runs), runs
    assert on(cluster, ENGINE_DEPLOYMENT) == [spare.name]


def watch(cluster, replica_id: str, timeout_s: float) -> list[tuple[float, str, bool]]:
    """Until a replica is gone from Serve's details and another one runs: (wall clock, its state or "gone", whether
    another one runs)."""
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replicas = {r["replica_id"]: r["state"] for r in cluster.replica_details(ENGINE_DEPLOYMENT)}
        seen.append((time.time(), replicas.pop(replica_id, "gone"), "RUNNING" in replicas.values()))
        if seen[-1][1:] == ("gone", True):
            return seen
        time.sleep(0.25)
    raise AssertionError(f"no replacement for replica {replica_id} after {timeout_s:.0f} s: {dedupe(seen)}")


def dedupe(seen: list[tuple]) -> list[tuple]:
    return [s for i, s in enumerate(seen) if i == 0 or s[1] != seen[i - 1][1]]
