"""Faults on the live stack: nothing lost, nothing thrown away, nothing abandoned running.

Each test injects one fault by its real mechanism while a mixed load is in flight — fal queue jobs (running and
queued), Eachlabs predictions, fal sync runs, new submits, status polls and readiness probes — and then checks:

- every accepted job ends, and ends well (a job is never lost: no 404, nothing left queued or running);
- nothing is regenerated: no job's generation, once finished, runs again. Two markers: a job's log lines (one
  "Generated <n> tokens" per finished generation) and the engine's own counters (finished generations, at most
  one per job and one per sync run of the load);
- work interrupted by the fault is re-run at most once (a job's `attempts`, and its "re-queued" log line):
  after an engine or ingress replica kill, only the jobs that were running; after a store fault, however long,
  none (leases stand still while the store is away);
- every webhook is delivered, at least once (counted per job id by a receiver in the test);
- every 5xx is a documented one (503 in the API's shape); no 500, no connection dropped;
- /readyz is 200 again after each fault (and 503 while Redis is frozen, when readiness asks the store);
- afterwards no generation runs in the engine, no job runs in the store, and every key can take every one of
  its concurrency slots again.

Each prints its row of the table (one line per figure, through `report_cost`) before it asserts, so a failing
run still shows its figures.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from ray import serve

from serve.api.health import Readiness
from serve.app import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT
from serve.jobs.factory import build_store
from serve.jobs.models import REQUEUED
from tests.conftest import data_uri
from tests.faults.conftest import EACH_KEY, FAL_KEY, KEYS, LEASE_S, SYNC_KEY

APP = "/fal-ai/llavav15-13b"
FAL = {"Authorization": f"Key {FAL_KEY}"}
EACH = {"X-API-Key": EACH_KEY}
SYNC = {"Authorization": f"Key {SYNC_KEY}"}
IMAGE = data_uri()
OWNER = {"fal": "faults-fal", "eachlabs": "faults-each"}
CLEAN_FAL_503 = ("runner_disconnected", "runner_scheduling_failure")
# Readiness that also asks the job store (the fault issue adds it): only then is /readyz expected to follow it.
READINESS_ASKS_THE_STORE = "store" in inspect.signature(Readiness.__init__).parameters


# -- the load ----------------------------------------------------------------------------------------------


@dataclass
class Tracked:
    api: str  # fal | eachlabs
    accepted_at: float
    final: str | None = None  # "succeeded", or "failed: <why>", or "cancelled"
    lost: str | None = None  # why it counts as lost (a 404)
    tokens: int | None = None  # fal: the result's num_output_tokens


@dataclass
class Load:
    """The mixed load of one test, and everything it was answered."""

    base: str
    tokens: int
    webhook: str  # every job's webhook (the receiver counts deliveries by job id)
    jobs: dict[str, Tracked] = field(default_factory=dict)
    sync: Counter = field(default_factory=Counter)  # "ok", "failed cleanly: <why>", "refused 429", "unexpected ..."
    submits: Counter = field(default_factory=Counter)  # submit/create answers that accepted nothing
    clean_5xx: Counter = field(default_factory=Counter)  # documented 503s, by operation and reason
    unexpected: list[str] = field(default_factory=list)  # 5xx outside the tables, dropped connections
    readyz: list[tuple[float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # Each answer is classified once: a documented 503 is clean, any other 5xx (or no answer) is unexpected.
    def answered(self, api: str, op: str, resp: requests.Response) -> None:
        if resp.status_code < 500:
            return
        reason = clean_503(api, resp)
        with self.lock:
            if reason is not None:
                self.clean_5xx[f"{op} {reason}"] += 1
            else:
                self.unexpected.append(f"{op}: {resp.status_code} {resp.text[:200]}")

    def dropped(self, op: str, exc: Exception) -> None:
        with self.lock:
            self.unexpected.append(f"{op}: no answer ({type(exc).__name__}: {str(exc)[:160]})")

    def call(self, api: str, op: str, method: str, url: str, **kwargs) -> requests.Response | None:
        try:
            resp = requests.request(method, url, timeout=kwargs.pop("timeout", 60), **kwargs)
        except requests.RequestException as exc:
            self.dropped(op, exc)
            return None
        self.answered(api, op, resp)
        return resp

    # -- jobs ---------------------------------------------------------------------------------------------

    def submit_fal(self) -> str | None:
        body = {"prompt": "Describe the picture.", "image_url": IMAGE, "max_new_tokens": self.tokens,
                "temperature": 0}
        return self._accept("fal", "fal submit", f"/queue{APP}?fal_webhook={self.webhook}", body, FAL, "request_id")

    def create_each(self) -> str | None:
        body = {"model": "llava-13b", "webhook_url": self.webhook,
                "input": {"image": IMAGE, "prompt": "Describe the picture.", "max_tokens": self.tokens,
                          "temperature": 0}}
        return self._accept("eachlabs", "eachlabs create", "/v1/prediction/", body, EACH, "predictionID")

    def _accept(self, api: str, op: str, path: str, body: dict, headers: dict, id_field: str) -> str | None:
        """Submit one job; its id, tracked, when it was accepted (a refusal is counted by its status)."""
        resp = self.call(api, op, "POST", f"{self.base}{path}", json=body, headers=headers)
        if resp is None:
            return None
        if resp.status_code != 200:
            with self.lock:
                self.submits[f"{op} {resp.status_code}"] += 1
            return None
        job_id = resp.json()[id_field]
        with self.lock:
            self.jobs[job_id] = Tracked(api, time.monotonic())
        return job_id

    def _read(self, job: Tracked, op: str, url: str, **kwargs) -> requests.Response | None:
        """A status read; None when it tells nothing yet (no answer, a 5xx) or the job is lost (a 404)."""
        resp = self.call(job.api, op, "GET", url, **kwargs)
        if resp is None or resp.status_code >= 500:
            return None
        if resp.status_code == 404:
            job.lost = f"{op.rsplit(' ', 1)[1]} 404"
            return None
        return resp

    def poll_once(self, rid: str, job: Tracked) -> None:
        """One status read, as the clients poll; records the job's end when it has one."""
        if job.api == "fal":
            resp = self._read(job, "fal status", f"{self.base}/queue{APP}/requests/{rid}/status",
                              params={"logs": "1"}, headers=FAL)
            if resp is None:
                return
            status = resp.json()
            if status["status"] != "COMPLETED":
                return
            if "error_type" in status:
                job.final = f"failed: {status['error_type']}" if status["error_type"] != "request_cancelled" else "cancelled"
                return
            result = self.call("fal", "fal result", "GET", f"{self.base}/queue{APP}/requests/{rid}", headers=FAL)
            if result is None or result.status_code >= 500:
                return  # read again at the next poll
            if result.status_code != 200:
                job.final = f"failed: result {result.status_code}"
                return
            job.tokens = result.json()["stats"]["num_output_tokens"]
            job.final = "succeeded"
        else:
            resp = self._read(job, "eachlabs get", f"{self.base}/v1/prediction/{rid}", headers=EACH)
            if resp is None:
                return
            got = resp.json()
            if got["status"] == "success":
                job.final = "succeeded"
            elif got["status"] == "error":
                job.final = f"failed: {got['output']['error_code']}"
            elif got["status"] == "cancelled":
                job.final = "cancelled"

    def unfinished(self) -> dict[str, Tracked]:
        with self.lock:
            return {rid: job for rid, job in self.jobs.items() if job.final is None and job.lost is None}

    # -- background work ---------------------------------------------------------------------------------

    def poller(self, stop: threading.Event) -> None:
        while not stop.is_set():
            for rid, job in self.unfinished().items():
                self.poll_once(rid, job)
            stop.wait(0.3)

    def sync_worker(self, stop: threading.Event) -> None:
        body = {"prompt": "Describe the picture.", "image_url": IMAGE, "max_new_tokens": self.tokens,
                "temperature": 0}
        while not stop.is_set():
            resp = self.call("fal", "fal run", "POST", f"{self.base}{APP}", json=body, headers=SYNC, timeout=240)
            if resp is None:
                outcome = "no answer"
            elif resp.status_code == 200:
                outcome = "ok" if resp.json()["stats"]["num_output_tokens"] == self.tokens else "short answer"
            elif resp.status_code == 429:
                outcome = "refused 429"
            elif clean_503("fal", resp) is not None:
                outcome = f"failed cleanly: 503 {clean_503('fal', resp)}"
            else:
                outcome = f"unexpected {resp.status_code}"
            with self.lock:
                self.sync[outcome] += 1
            if outcome != "ok":
                stop.wait(0.5)  # as a client backs off: no spinning on refusals while the fault lasts

    def submitter(self, stop: threading.Event, most: int) -> None:
        """New work while the fault lasts: a fal job and an Eachlabs prediction in turn, one a second."""
        for i in range(most):
            if stop.is_set():
                return
            self.submit_fal() if i % 2 == 0 else self.create_each()
            stop.wait(1.0)

    def prober(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                code = requests.get(f"{self.base}/readyz", timeout=30).status_code
            except requests.RequestException as exc:
                self.dropped("readyz", exc)
                code = 0
            with self.lock:
                self.readyz.append((time.monotonic(), code))
            stop.wait(0.5)


def clean_503(api: str, resp: requests.Response) -> str | None:
    """The reason of a documented 503 in the API's own shape, or None (an unexpected 5xx)."""
    if resp.status_code != 503:
        return None
    try:
        body = resp.json()
    except ValueError:
        return None
    if api == "fal" and isinstance(body, dict) and body.get("error_type") in CLEAN_FAL_503 \
            and "x-fal-request-id" in resp.headers:
        return body["error_type"]
    if api == "eachlabs" and isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str):
        return "unavailable" if "model" in body["error"] else "store_unavailable"
    return None


class Background:
    """Runs the load's background threads until told to stop them, by name."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(16)
        self._running: dict[str, tuple[threading.Event, list]] = {}

    def start(self, name: str, work, *args, threads: int = 1) -> None:
        stop = threading.Event()
        self._running[name] = (stop, [self._pool.submit(work, stop, *args) for _ in range(threads)])

    def stop(self, name: str, timeout_s: float = 300) -> None:
        stop, futures = self._running.pop(name)
        stop.set()
        for f in futures:
            f.result(timeout=timeout_s)

    def close(self) -> None:
        for name in list(self._running):
            self.stop(name)
        self._pool.shutdown()


# -- the stack's own view ----------------------------------------------------------------------------------


def engine_stats(cfg) -> dict[str, int] | None:
    """The engine replica's counters (running, finished, failed, aborted), or None while it does not answer."""
    try:
        handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=cfg.app_name)
        return handle.stats.remote().result(timeout_s=10)
    except Exception:
        return None


def stored(cfg, jobs: dict[str, Tracked]) -> dict:
    """Each job as the store keeps it (attempts, log lines), and the store's counts."""
    async def read():
        store = build_store(cfg)
        try:
            return {rid: await store.get(rid, OWNER[job.api]) for rid, job in jobs.items()}, await store.counts()
        finally:
            await store.aclose()

    return asyncio.run(read())


def live_slots(faults_redis, cfg) -> dict[str, int]:
    """Concurrency slots each key holds now (a slot is a member of the key's sorted set until its expiry)."""
    client = faults_redis.client()
    try:
        now = time.time()
        return {k["name"]: client.zcount(f"llava-serve:{cfg.app_name}:slots:{k['name']}", f"({now}", "+inf")
                for k in KEYS}
    finally:
        client.close()


def slots_usable(base: str) -> bool:
    """Every key takes all of its concurrency slots at once: max_concurrent short sync runs, every one 200."""
    def one(key: str) -> int:
        body = {"prompt": "Hi", "image_url": IMAGE, "max_new_tokens": 1}
        try:
            return requests.post(f"{base}{APP}", json=body, headers={"Authorization": f"Key {key}"},
                                 timeout=60).status_code
        except requests.RequestException:
            return 0

    calls = [k["key"] for k in KEYS for _ in range(k["max_concurrent"])]
    with ThreadPoolExecutor(len(calls)) as pool:
        return all(code == 200 for code in pool.map(one, calls))


def wait_until(what: str, check, timeout_s: float, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(every_s)


def replica_pid(app_name: str, deployment: str = ENGINE_DEPLOYMENT) -> int:
    """A replica's process, by its title (Ray names a replica's worker `ServeReplica:<app>:<deployment>`)."""
    title = f"ServeReplica:{app_name}:{deployment}".encode()
    found: dict[int, int] = {}  # pid: parent's pid
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if title in (entry / "cmdline").read_bytes():
                    found[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    # A process the replica forked carries its title too: the replica is the one whose parent does not.
    replicas = [pid for pid, parent in found.items() if parent not in found]
    assert len(replicas) == 1, f"processes titled {title.decode()} (pid: parent): {found}"
    return replicas[0]


# -- the row of the table ----------------------------------------------------------------------------------


@dataclass
class Row:
    fault: str
    load: Load
    cfg: object
    per_job: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # attempts_of
    engine_surplus: int | None = None  # finished generations beyond what the load asked for
    rerun_why: str = ""
    abandoned: list[str] = field(default_factory=list)
    recovery: str = ""
    slots_s: float | None = None
    stats_before: dict | None = None
    stats_ended: dict | None = None  # the engine's counters once every job ended (before the slot probes)
    rerun_logs: dict[str, list[tuple[float, str]]] = field(default_factory=dict)  # a re-run job's log lines
    webhooks: dict[str, int] = field(default_factory=dict)  # acknowledged deliveries per job

    def undelivered(self) -> list[str]:
        return [rid for rid, n in self.webhooks.items() if not n]

    def regenerated(self) -> dict[str, int]:
        """Jobs whose finished generation ran again: by their log lines, and the engine's surplus."""
        return {rid: generated for rid, (_, generated, _) in self.per_job.items() if generated > 1}

    def rerun(self) -> set[str]:
        return {rid for rid, (attempts, _, _) in self.per_job.items() if attempts > 1}

    def lost(self) -> list[str]:
        return [f"{rid} ({job.api}: {job.lost or 'never ended'})" for rid, job in self.load.jobs.items()
                if job.lost is not None or job.final is None]

    def report(self, report_cost) -> None:
        jobs, sync = self.load.jobs.values(), self.load.sync
        by_api = Counter(job.api for job in jobs)
        finals = Counter(job.final for job in jobs if job.final and job.lost is None)
        failed = {k: v for k, v in finals.items() if k != "succeeded"}
        sync_failed = {k: v for k, v in sync.items() if k not in ("ok",)}
        line = lambda text: report_cost(f"faults {self.fault}: {text}")  # noqa: E731
        line(f"jobs accepted {len(jobs)} (fal {by_api['fal']}, eachlabs {by_api['eachlabs']}); sync runs "
             f"{sum(sync.values())}; submits not accepted {dict(self.load.submits) or 0}")
        line(f"completed {finals['succeeded']} jobs, {sync['ok']} sync runs")
        line(f"failed cleanly {sum(failed.values()) + sum(sync_failed.values())}"
             f" (jobs {failed or 0}; sync {sync_failed or 0}; documented 503s answered "
             f"{sum(self.load.clean_5xx.values())}: {dict(self.load.clean_5xx) or 0})")
        line(f"lost {len(self.lost())}" + (f": {self.lost()}" if self.lost() else ""))
        if self.engine_surplus is None:
            surplus = "engine counters reset by the fault"
        else:
            moved = {k: self.stats_ended[k] - self.stats_before[k] for k in ("finished", "failed", "aborted")}
            surplus = (f"engine's finished generations beyond the load's: {self.engine_surplus}, its counters "
                       f"{moved} for {len(self.load.jobs)} jobs and {sum(self.load.sync.values())} sync runs")
        regenerated = self.regenerated()
        line(f"regenerated {max(len(regenerated), self.engine_surplus or 0)} (jobs generated twice by their logs: "
             f"{regenerated or 0}; {surplus})")
        requeued = sum(r for _, _, r in self.per_job.values())
        line(f"re-run after an interruption {len(self.rerun())} (re-queued log lines {requeued}"
             f"{'; ' + self.rerun_why if self.rerun_why else ''})")
        line(f"unexpected 5xx {len(self.load.unexpected)}"
             + (f": {self.load.unexpected[:5]}" if self.load.unexpected else ""))
        line(f"abandoned running {len(self.abandoned)}" + (f": {self.abandoned}" if self.abandoned else ""))
        twice = {rid: n for rid, n in self.webhooks.items() if n > 1}
        line(f"webhooks delivered {sum(1 for n in self.webhooks.values() if n)} of {len(self.webhooks)} jobs, at "
             f"least once (receivers dedupe by the payload's id): {len(twice)} delivered more than once"
             + (f" {twice}" if twice else "") + (f"; never: {self.undelivered()}" if self.undelivered() else ""))
        slots = "never (within the test's deadline)" if self.slots_s is None else f"{self.slots_s:.1f} s"
        line(f"every key's slots usable again after {slots}; {self.recovery}")


def readyz_summary(load: Load, start: float, end: float) -> str:
    codes = Counter(code for t, code in load.readyz if start <= t <= end)
    return ", ".join(f"{n} x {code}" for code, n in sorted(codes.items())) or "none"


def settle(row: Row, base: str, faults_redis, cleared_at: float, jobs_timeout_s: float, receiver) -> dict:
    """After the fault: every job ends, nothing runs, every key's slots come back, every webhook is delivered;
    the times, from `cleared_at`."""
    load, cfg = row.load, row.cfg
    wait_until("jobs ended", lambda: not load.unfinished(), jobs_timeout_s)
    ended_s = time.monotonic() - cleared_at
    # A delivery its replica could not finish is taken over once its outbox lease (12 s) runs out.
    wait_until("webhooks", lambda: all(receiver.delivered(load.jobs).values()), 60)
    row.webhooks = receiver.delivered(load.jobs)
    row.stats_ended = engine_stats(cfg)
    if row.stats_before and row.stats_ended:
        # A finished generation per job and per sync run at most (a run refused before the engine adds none):
        # more is a generation run twice. After an engine kill the counters start again: no figure.
        asked = len(load.jobs) + sum(load.sync.values())
        row.engine_surplus = max(0, row.stats_ended["finished"] - row.stats_before["finished"] - asked)
    free = wait_until("slots free", lambda: not any(live_slots(faults_redis, cfg).values()), 30)
    if free and wait_until("slots usable", lambda: slots_usable(base), 30, every_s=1.0):
        row.slots_s = time.monotonic() - cleared_at
    row.recovery += f"{'every job ended' if not load.unfinished() else 'jobs still unfinished'} after {ended_s:.1f} s"
    records, counts = stored(cfg, load.jobs)
    stats = engine_stats(cfg)
    row.abandoned = [f"store {k} {v}" for k, v in counts.items() if v]
    if stats is None or stats["running"]:
        row.abandoned.append(f"engine running {stats and stats['running']}")
    row.abandoned += [f"{rid} {job.status.value}" for rid, job in records.items()
                      if job is not None and job.status.value in ("queued", "running")]
    row.per_job = attempts_of(records)
    row.rerun_logs = {rid: [(line.timestamp, line.message) for line in job.logs] for rid, job in records.items()
                      if job is not None and job.attempts > 1}
    return records


def attempts_of(records: dict) -> dict[str, tuple[int, int, int]]:
    """Per job: claims (attempts), finished generations ("Generated <n> tokens ..." log lines), re-queues."""
    out = {}
    for rid, job in records.items():
        if job is None:
            continue
        messages = [line.message for line in job.logs]
        out[rid] = (job.attempts, sum(m.startswith("Generated ") for m in messages), messages.count(REQUEUED))
    return out


# -- the faults --------------------------------------------------------------------------------------------


@pytest.fixture
def redis_running(faults_redis):
    """Redis up and answering before each test (a failed test may have left it stopped or frozen)."""
    if faults_redis.paused:
        faults_redis.resume()
    if faults_redis.proc is None or faults_redis.proc.poll() is not None:
        faults_redis.start()
    yield faults_redis
    if faults_redis.paused:
        faults_redis.resume()
    if faults_redis.proc.poll() is not None:
        faults_redis.start()


@pytest.fixture
def background():
    bg = Background()
    yield bg
    bg.close()


def ready_now(base: str) -> None:
    """Until /readyz answers 200 (an earlier test that failed may have left the engine replica starting)."""
    def ready():
        try:
            return requests.get(f"{base}/readyz", timeout=30).status_code == 200
        except requests.RequestException:
            return False

    assert wait_until("ready", ready, 240), "not ready"


def quiet(cfg) -> dict:
    """Until nothing of an earlier test runs (no job queued or running, no generation in the engine); the
    engine's counters then, the baseline of this test's figures."""
    def idle():
        _, counts = stored(cfg, {})
        stats = engine_stats(cfg)
        return stats if stats is not None and not stats["running"] and not any(counts.values()) else None

    stats = wait_until("quiet", idle, 240)
    assert stats, "an earlier test's work is still running"
    return stats


def start_load(load: Load, bg: Background, fal_jobs: int, each_jobs: int, sync_threads: int) -> None:
    bg.start("readyz", load.prober)
    bg.start("sync", load.sync_worker, threads=sync_threads)
    for _ in range(fal_jobs):
        assert load.submit_fal(), load.submits
    for _ in range(each_jobs):
        assert load.create_each(), load.submits
    bg.start("poll", load.poller)


def wait_generating(cfg, at_least: int, timeout_s: float = 60) -> dict:
    """Until the engine runs at least this many generations at once (the fault must hit work in flight)."""
    stats = wait_until("generating", lambda: (s := engine_stats(cfg)) and s["running"] >= at_least and s,
                       timeout_s, every_s=0.1)
    assert stats, f"the engine never ran {at_least} generations at once: {engine_stats(cfg)}"
    return stats


ENGINE_TOKENS = 1024  # seconds of work at the batch this load makes, so that the kill finds it running
STORE_TOKENS = 512


def test_engine_replica_killed_mid_generation(stack, faults_config, redis_running, background, report_cost,
                                              receiver):
    cfg = faults_config
    ready_now(stack)
    quiet(cfg)
    load = Load(stack, ENGINE_TOKENS, receiver.url)
    start_load(load, background, fal_jobs=6, each_jobs=4, sync_threads=3)
    running = wait_generating(cfg, at_least=8)
    records_before, _ = stored(cfg, load.jobs)
    running_jobs = {rid for rid, job in records_before.items() if job is not None and job.status.value == "running"}

    pid = replica_pid(cfg.app_name)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    background.start("submit", load.submitter, 4)  # new jobs while the replica is gone
    time.sleep(1.0)
    background.stop("sync")  # the runs in flight at the kill have their answers (or get them when it is back)
    background.stop("submit")

    # Readiness follows the engine: not ready once Serve sees the replica gone, ready again with its replacement.
    def back_at() -> float | None:
        with load.lock:
            seen = [(t, c) for t, c in load.readyz if t > killed_at]
        down = next((t for t, c in seen if c != 200), None)
        return None if down is None else next((t for t, c in seen if t > down and c == 200), None)

    ready = wait_until("ready", back_at, 240)
    ready_s = (ready or time.monotonic()) - killed_at
    fresh = requests.post(f"{stack}{APP}", json={"prompt": "hi", "image_url": IMAGE, "max_new_tokens": 3},
                          headers=SYNC, timeout=120)

    row = Row("engine replica kill -9", load, cfg)
    row.recovery = (f"readyz {readyz_summary(load, killed_at, killed_at + ready_s)} until 200 after {ready_s:.1f} s; "
                    f"a fresh run after it: {fresh.status_code}; ")
    settle(row, stack, redis_running, killed_at, jobs_timeout_s=240, receiver=receiver)
    background.stop("poll")
    background.stop("readyz")
    per_job, rerun = row.per_job, row.rerun()
    row.rerun_why = (f"at the kill {len(running_jobs)} jobs were running, and the engine ran "
                     f"{running['running']} generations")
    row.report(report_cost)

    assert pid not in (replica_pid(cfg.app_name),)  # Serve replaced the replica
    assert ready and fresh.status_code == 200, fresh.text
    assert not row.lost()
    assert all(job.final == "succeeded" for job in load.jobs.values()), Counter(j.final for j in load.jobs.values())
    assert all(job.tokens in (None, ENGINE_TOKENS) for job in load.jobs.values())
    assert not row.regenerated()
    # Re-run once at most, and only the jobs the kill interrupted (each logged as re-queued).
    assert all(attempts <= 2 for attempts, _, _ in per_job.values()), per_job
    assert rerun <= running_jobs, (rerun, running_jobs)
    assert all(requeued == attempts - 1 for attempts, _, requeued in per_job.values()), per_job
    assert not load.unexpected
    assert set(load.sync) <= {"ok", "failed cleanly: 503 runner_disconnected"}, load.sync
    assert not row.abandoned
    assert row.slots_s is not None
    assert not row.undelivered()


def test_ingress_replica_killed_with_jobs_running_and_webhooks_waiting(stack, faults_config, redis_running,
                                                                       background, report_cost, receiver):
    """The ingress replica (its runner, its webhook deliveries) dies: its running jobs' leases lapse and the
    replacement's runner re-queues them; each delivery it was retrying is taken over once its outbox lease runs out.
    The stack has one ingress replica, so requests get 503s from Serve's proxy until the replacement is up: those
    are counted, not failed (production runs two or more, behind a load balancer that retries)."""
    cfg = faults_config
    ready_now(stack)
    load = Load(stack, ENGINE_TOKENS, receiver.url)
    row = Row("ingress replica kill -9", load, cfg, stats_before=quiet(cfg))
    receiver.refuse_first = True  # every delivery waits 2 s to retry after its first attempt
    try:
        start_load(load, background, fal_jobs=6, each_jobs=2, sync_threads=0)
        wait_generating(cfg, at_least=6)
        # Two short predictions beside the long jobs: they end at once, and their webhooks wait to retry when the
        # replica dies, while the long jobs are early in their generations (some fal jobs queued behind its cap).
        load.tokens = 4
        short = [load.create_each(), load.create_each()]
        wait_until("deliveries refused", lambda: all(receiver.refused[rid] for rid in short), 60, every_s=0.05)
        records_before, _ = stored(cfg, load.jobs)
        running_jobs = {rid for rid, job in records_before.items() if job is not None and job.status.value == "running"}
        waiting = {rid for rid in load.jobs if receiver.refused[rid] and not receiver.acked[rid]}
        pid = replica_pid(cfg.app_name, INGRESS_DEPLOYMENT)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        background.stop("poll")  # Serve's proxy has nowhere to send them until the replacement is up
        ready = wait_until("ready", lambda: requests.get(f"{stack}/readyz", timeout=30).status_code == 200, 120)
        ready_s = time.monotonic() - killed_at
        background.start("poll", load.poller)
        load.tokens = ENGINE_TOKENS
        row.recovery = (f"ready again after {ready_s:.1f} s ({len(running_jobs)} jobs running at the kill, "
                        f"{len(waiting)} webhooks waiting to retry); ")
        settle(row, stack, redis_running, killed_at, jobs_timeout_s=180, receiver=receiver)
    finally:
        receiver.refuse_first = False
    background.stop("poll")
    background.stop("readyz")
    rerun = row.rerun()
    row.rerun_why = f"the jobs running on the dead replica: {len(running_jobs)}"
    row.report(report_cost)

    assert replica_pid(cfg.app_name, INGRESS_DEPLOYMENT) != pid and ready
    assert not row.lost()
    assert all(job.final == "succeeded" for job in load.jobs.values()), Counter(j.final for j in load.jobs.values())
    assert not row.regenerated(), row.per_job
    assert row.engine_surplus == 0  # the dead replica's generations were aborted, not run to their end
    assert rerun <= running_jobs, (rerun, running_jobs)
    assert all(attempts <= 2 and requeued == attempts - 1 for attempts, _, requeued in row.per_job.values())
    assert not [u for u in load.unexpected if not u.startswith(("fal status: 503", "eachlabs get: 503",
                                                                "fal result: 503"))], load.unexpected
    assert not row.abandoned
    assert row.slots_s is not None
    assert not row.undelivered()


def store_fault(name: str, inject, stack, cfg, faults_redis, background, report_cost, receiver, *,
                long: bool) -> None:
    """One store fault with the load in flight. `inject()` returns once the store is back. long: past the leases
    (readiness must have said 503 meanwhile)."""
    ready_now(stack)
    load = Load(stack, STORE_TOKENS, receiver.url)
    row = Row(name, load, cfg, stats_before=quiet(cfg))
    start_load(load, background, fal_jobs=6, each_jobs=4, sync_threads=2)
    wait_generating(cfg, at_least=6)
    # Some jobs done before the fault (their generation must not run again), some mid-generation, some queued.
    wait_until("one job done", lambda: any(j.final for j in load.jobs.values()), 60, every_s=0.1)
    done_before = sum(1 for j in load.jobs.values() if j.final)
    background.start("submit", load.submitter, 10)
    fault_at, fault_wall = time.monotonic(), time.time()
    inject()
    cleared_at = time.monotonic()
    time.sleep(2.0)  # the load goes on a moment on the store back
    background.stop("sync")
    background.stop("submit")

    row.recovery = (f"fault {cleared_at - fault_at:.1f} s, readyz during it {readyz_summary(load, fault_at, cleared_at)}, "
                    f"{done_before} jobs had ended before it; ")
    settle(row, stack, faults_redis, cleared_at, jobs_timeout_s=120, receiver=receiver)
    background.stop("poll")
    background.stop("readyz")
    rerun = row.rerun()
    row.rerun_why = "leases stand still while the store is away: none expected"
    # Ready again soon: a pooled connection that the restart broke fails once (one cached 503), then reconnects.
    asked, ready_after = time.monotonic(), 0
    while ready_after != 200 and time.monotonic() < asked + 10:
        ready_after = requests.get(f"{stack}/readyz", timeout=30).status_code
        time.sleep(0.25 if ready_after != 200 else 0)
    row.recovery = f"readyz after it {ready_after} ({time.monotonic() - asked:.1f} s on); " + row.recovery
    row.report(report_cost)
    for rid, lines in row.rerun_logs.items():  # what a re-run job went through, in seconds from the fault
        print(f"{name}: re-run {rid}: " + "; ".join(f"{t - fault_wall:+.2f} s {m}" for t, m in lines))

    assert not row.lost()
    assert all(job.final == "succeeded" for job in load.jobs.values()), Counter(j.final for j in load.jobs.values())
    assert all(job.tokens in (None, STORE_TOKENS) for job in load.jobs.values())
    # However long the outage: no finished generation runs again, and no job is re-run (its lease stood still
    # while the store was away, so no reap took it from the runner that kept working).
    assert not row.regenerated(), row.per_job
    assert row.engine_surplus == 0
    assert not rerun, row.per_job
    assert not load.unexpected
    assert not row.abandoned
    assert row.slots_s is not None
    assert ready_after == 200
    assert not row.undelivered()
    if long and READINESS_ASKS_THE_STORE:
        assert any(fault_at <= t <= cleared_at and c == 503 for t, c in load.readyz), load.readyz


RESTART_DOWN_S = 1.0
OUTAGE_S = 20.0  # past several leases (LEASE_S): nobody can renew a lease through it


def test_redis_restarted_with_jobs_in_flight(stack, faults_config, redis_running, background, report_cost, receiver):
    # A restart: down about a second, within a lease (LEASE_S).
    store_fault("redis restart", lambda: redis_running.restart(down_s=RESTART_DOWN_S), stack, faults_config,
                redis_running, background, report_cost, receiver, long=False)


def test_redis_stopped_past_the_leases_with_jobs_in_flight(stack, faults_config, redis_running, background,
                                                          report_cost, receiver):
    # Stopped (connections refused: every call fails at once) for several leases, then started on its data.
    assert OUTAGE_S > 3 * LEASE_S
    store_fault(f"redis stopped {OUTAGE_S:.0f} s", lambda: redis_running.restart(down_s=OUTAGE_S), stack,
                faults_config, redis_running, background, report_cost, receiver, long=True)


def frozen(redis_running, seconds: float):
    def freeze():
        redis_running.pause()
        try:
            time.sleep(seconds)
        finally:
            redis_running.resume()
    return freeze


SHORT_FREEZE_S = LEASE_S / 2  # within every running job's lease (renewed every LEASE_S / 3)


def test_redis_frozen_within_a_lease_with_jobs_in_flight(stack, faults_config, redis_running, background,
                                                         report_cost, receiver):
    store_fault(f"redis frozen {SHORT_FREEZE_S:.0f} s (SIGSTOP)", frozen(redis_running, SHORT_FREEZE_S), stack,
                faults_config, redis_running, background, report_cost, receiver, long=False)


def test_redis_frozen_past_the_leases_with_jobs_in_flight(stack, faults_config, redis_running, background,
                                                          report_cost, receiver):
    # Frozen (calls neither answered nor refused: they wait, and run when it resumes, carrying the time they
    # were sent at) for several leases.
    store_fault(f"redis frozen {OUTAGE_S:.0f} s (SIGSTOP)", frozen(redis_running, OUTAGE_S), stack,
                faults_config, redis_running, background, report_cost, receiver, long=True)
