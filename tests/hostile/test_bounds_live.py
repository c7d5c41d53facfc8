"""One abusive key against each bound on the live stack, while a second key keeps being served
(docs/bounds.md). Each test runs its abuse in the background, checks the abuser gets the bound's answer in
its API's shape, checks every one of the victim's requests succeeded meanwhile, and prints the victim's p50
latency during the abuse against its idle baseline (figures, not timed assertions)."""

from __future__ import annotations

import base64
import io
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
import requests
import yaml
from PIL import Image

from tests.conftest import data_uri
from tests.hostile.conftest import ABUSER_CONCURRENT, ABUSER_KEY, KEYS, KEYS_RELOAD_S, REVOKED_KEY, VICTIM_KEY
from tests.integration.conftest import exchange

APP = "/fal-ai/llavav15-13b"
ABUSER = {"Authorization": f"Key {ABUSER_KEY}"}
VICTIM = {"Authorization": f"Key {VICTIM_KEY}"}
SMALL = data_uri()
INTERNALS = ("Traceback", "ray::", "pid=", '.py"', "\x1b[")


def victim_run(base: str) -> float:
    """One short fal sync run of the well-behaved key: its seconds; it must succeed."""
    started = time.monotonic()
    resp = requests.post(f"{base}{APP}", json={"prompt": "What colour?", "image_url": SMALL, "max_new_tokens": 8,
                                               "temperature": 0}, headers=VICTIM, timeout=60)
    assert resp.status_code == 200, resp.text
    return time.monotonic() - started


def p50(base: str, runs: int) -> float:
    return statistics.median(victim_run(base) for _ in range(runs))


@pytest.fixture(scope="module")
def baseline(stack) -> float:
    victim_run(stack)  # warm
    return p50(stack, 9)


@contextmanager
def abusing(work, threads: int = 4):
    """Run `work(stop)` on `threads` threads until the block ends; re-raises what a worker raised."""
    stop = threading.Event()
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(work, stop) for _ in range(threads)]
        try:
            yield
        finally:
            stop.set()
            for f in futures:
                f.result(timeout=120)


def compare(report_cost, what: str, base: str, baseline_s: float, runs: int = 9) -> None:
    during = p50(base, runs)
    report_cost(f"hostile {what}: victim p50 {during * 1000:.0f} ms during the abuse, {baseline_s * 1000:.0f} ms "
                f"idle ({during / baseline_s:.2f}x)")


def clean(text: str) -> None:
    assert not any(marker in text for marker in INTERNALS), text


def cancel_all(base: str, ids: list[str]) -> None:
    for rid in ids:
        requests.put(f"{base}/queue{APP}/requests/{rid}/cancel", headers=ABUSER, timeout=10)


def wait_done(base: str, rid: str, headers: dict, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resp = requests.get(f"{base}/queue{APP}/requests/{rid}/status", headers=headers, timeout=10)
        if resp.status_code == 200 and resp.json()["status"] == "COMPLETED":
            return resp.json()
        time.sleep(0.2)
    raise AssertionError(f"{rid} not done after {timeout_s} s")


# -- bodies ------------------------------------------------------------------------------------------------


def test_oversized_bodies_are_refused_while_another_key_is_served(stack, hostile_config, baseline, report_cost):
    cap = hostile_config.http.max_body_bytes
    head = (f"POST {APP} HTTP/1.1\r\nHost: {urlsplit(stack).netloc}\r\n{'Authorization: Key ' + ABUSER_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {4 * cap}\r\n\r\n")
    answers = []

    def oversized(stop):
        while not stop.is_set():
            status, body, _ = exchange(stack, head, (b" " * 65536 for _ in range(16)))
            answers.append((status, body))

    with abusing(oversized):
        compare(report_cost, f"bodies ({4 * cap / 2**20:.0f} MiB announced)", stack, baseline)
    assert answers and all(status == 413 and body["error_type"] == "request_too_large" for status, body in answers)
    report_cost(f"hostile bodies: the largest body one key can send is {cap / 2**20:.0f} MiB (http.max_body_bytes)")


# -- the queue and the store --------------------------------------------------------------------------------


def _submit(base: str, **fields):
    body = {"prompt": "Describe it at length.", "image_url": SMALL, "max_new_tokens": 256, **fields}
    return requests.post(f"{base}/queue{APP}", json=body, headers=ABUSER, timeout=30)


def _fill(base: str, most: int, **fields) -> tuple[list[str], requests.Response | None]:
    """Submit as the abuser until refused (at most `most` times): the ids accepted, and the refusal."""
    accepted = []
    for _ in range(most):
        resp = _submit(base, **fields)
        if resp.status_code != 200:
            return accepted, resp
        accepted.append(resp.json()["request_id"])
    return accepted, None


def test_one_keys_backlog_stops_at_its_pending_cap_and_others_still_start(stack, hostile_config, baseline,
                                                                           report_cost):
    cap = hostile_config.limits.max_pending
    accepted, refused = _fill(stack, cap + ABUSER_CONCURRENT + 10)
    try:
        assert refused is not None and refused.status_code == 429, refused and refused.text
        assert "waiting in the queue" in refused.json()["detail"] and "retry-after" in refused.headers
        # Another key's queued job is claimed past the whole backlog (claims skip a key at its cap).
        started = time.monotonic()
        rid = requests.post(f"{stack}/queue{APP}", json={"prompt": "Hi", "image_url": SMALL, "max_new_tokens": 8},
                            headers=VICTIM, timeout=30).json()["request_id"]
        wait_done(stack, rid, VICTIM)
        queued_s = time.monotonic() - started
        compare(report_cost, f"queue ({len(accepted)} jobs accepted)", stack, baseline)
        report_cost(f"hostile queue: one key holds at most {len(accepted)} unfinished jobs (limits.max_pending {cap} "
                    f"+ its running ones); another key's queued 8-token job took {queued_s * 1000:.0f} ms")
    finally:
        cancel_all(stack, accepted)
    assert len(accepted) <= cap + ABUSER_CONCURRENT


def _noise_png(size: int) -> str:
    """A PNG of about `size` bytes that does not compress (random pixels), as a data: URI."""
    side = int((size / 3) ** 0.5)
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, format="PNG", compress_level=0)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_one_key_cannot_store_more_than_its_bytes(stack, hostile_config, report_cost):
    cap = hostile_config.limits.max_stored_bytes
    image = _noise_png(cap // 4)
    accepted, refused = _fill(stack, 10, image_url=image)
    try:
        assert refused is not None and refused.status_code == 429, refused and refused.text
        assert "as many bytes as it may store" in refused.json()["detail"]
        # A status poll answers with the input abridged, whatever was submitted.
        status = requests.get(f"{stack}/queue{APP}/requests/{accepted[0]}/status", headers=ABUSER, timeout=10)
        assert len(status.content) < 4096
    finally:
        cancel_all(stack, accepted)
    stored = len(accepted) * len(image)
    report_cost(f"hostile store: one key stored {stored / 2**20:.1f} MiB of inputs before 429 "
                f"(limits.max_stored_bytes {cap / 2**20:.0f} MiB)")
    assert stored <= cap


# -- reads -------------------------------------------------------------------------------------------------


def test_a_polling_flood_is_429_while_another_keys_polls_are_served(stack, hostile_config, baseline, report_cost):
    rid = _submit(stack, max_new_tokens=4).json()["request_id"]
    codes: list[int] = []

    def flood(stop):
        with requests.Session() as s:
            while not stop.is_set():
                resp = s.get(f"{stack}/queue{APP}/requests/{rid}/status", headers=ABUSER, timeout=10)
                codes.append(resp.status_code)
                if resp.status_code == 429:
                    assert "Too many status reads" in resp.json()["detail"] and "retry-after" in resp.headers

    with abusing(flood):
        time.sleep(1)
        mine = requests.post(f"{stack}/queue{APP}", json={"prompt": "Hi", "image_url": SMALL, "max_new_tokens": 8},
                             headers=VICTIM, timeout=30).json()["request_id"]
        wait_done(stack, mine, VICTIM)  # every poll of it answered
        compare(report_cost, "reads", stack, baseline)
    refused = codes.count(429)
    report_cost(f"hostile reads: {len(codes)} polls by one key, {refused} refused 429 "
                f"(reads.per_second {hostile_config.reads.per_second:g}, burst {hostile_config.reads.burst})")
    assert refused > 0 and codes.count(200) + codes.count(202) > 0


def test_status_streams_per_key_are_capped(stack, hostile_config):
    limit = hostile_config.reads.max_status_streams
    # Two long jobs take the abuser's concurrency; the third waits queued while its streams are open.
    ids = [_submit(stack, max_new_tokens=2000).json()["request_id"] for _ in range(ABUSER_CONCURRENT + 1)]
    rid = ids[-1]
    time.sleep(2.5)  # the read budget of the previous test refills
    opened = []
    try:
        for _ in range(limit):
            resp = requests.get(f"{stack}/queue{APP}/requests/{rid}/status/stream", headers=ABUSER, stream=True,
                                timeout=30)
            assert resp.status_code == 200
            opened.append(resp)
        extra = requests.get(f"{stack}/queue{APP}/requests/{rid}/status/stream", headers=ABUSER, timeout=30)
        assert extra.status_code == 429 and "open status streams" in extra.json()["detail"]
        mine = requests.get(f"{stack}/queue{APP}/requests/{rid}/status", headers=VICTIM, timeout=10)
        assert mine.status_code == 404  # not the victim's job, but the victim's reads are its own
    finally:
        for resp in opened:
            resp.close()
        cancel_all(stack, ids)
        for job_id in ids:  # its slots are free again for the tests after this one
            wait_done(stack, job_id, ABUSER)


# -- decodes -----------------------------------------------------------------------------------------------


def _png(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("size", [(1, 100_000), (60_000, 2)])
def test_an_extreme_aspect_ratio_is_refused_in_shape_without_the_engine(stack, size, report_cost):
    started = time.monotonic()
    resp = requests.post(f"{stack}{APP}", json={"prompt": "Hi", "image_url": _png(size)}, headers=ABUSER, timeout=60)
    seconds = time.monotonic() - started
    assert resp.status_code == 422, resp.text
    (item,) = resp.json()["detail"]
    assert item["loc"] == ["body", "image_url"] and item["type"] == "image_load_error"
    clean(resp.text)
    report_cost(f"hostile decodes: a {size[0]}x{size[1]} PNG refused in {seconds * 1000:.0f} ms")


def test_large_images_decode_within_the_budget_while_another_key_is_served(stack, hostile_config, baseline,
                                                                           report_cost):
    big = _png((6000, 6000))  # 36 MP, under the pixel cap; a few KB as PNG
    codes: list[int] = []

    def decode(stop):
        while not stop.is_set():
            resp = requests.post(f"{stack}{APP}", json={"prompt": "Hi", "image_url": big, "max_new_tokens": 1},
                                 headers=ABUSER, timeout=120)
            codes.append(resp.status_code)

    with abusing(decode, threads=6):
        time.sleep(1)
        compare(report_cost, "decodes (6 x 36 MP at once)", stack, baseline, runs=5)
    # 200, or 429 when the abuser's own concurrency cap refuses it: never a 5xx.
    assert codes and all(code in (200, 429) for code in codes), codes


# -- webhooks ----------------------------------------------------------------------------------------------


def _listening() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server, server.getsockname()[1]


def test_webhook_receivers_that_never_finish_are_cut_off(stack, hostile_config, report_cost):
    """An endless 200 body, and one byte a second: each delivery ends (the connection closed by us)."""
    endless, endless_port = _listening()
    slow, slow_port = _listening()
    closed = {}

    def serve(server, name, pace):
        conn, _ = server.accept()
        conn.recv(65536)
        sent, started = 0, time.monotonic()
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000000000\r\n\r\n")
            while time.monotonic() - started < 60:
                conn.sendall(b"x" * (65536 if pace == 0 else 1))
                sent += 65536 if pace == 0 else 1
                time.sleep(pace)
        except OSError:
            closed[name] = (sent, time.monotonic() - started)
        finally:
            conn.close()

    threads = [threading.Thread(target=serve, args=(endless, "endless", 0), daemon=True),
               threading.Thread(target=serve, args=(slow, "slow", 1.0), daemon=True)]
    for t in threads:
        t.start()
    ids = []
    for port in (endless_port, slow_port):
        resp = requests.post(f"{stack}/queue{APP}", params={"fal_webhook": f"http://127.0.0.1:{port}/hook"},
                             json={"prompt": "Hi", "image_url": SMALL, "max_new_tokens": 2}, headers=ABUSER,
                             timeout=30)
        ids.append(resp.json()["request_id"])
    for t in threads:
        t.join(timeout=90)
    endless.close()
    slow.close()
    assert set(closed) == {"endless", "slow"}, closed
    for name, (sent, seconds) in closed.items():
        report_cost(f"hostile webhooks: {name} receiver cut off after {seconds:.1f} s, {sent} bytes written "
                    f"(webhooks.timeout_s {hostile_config.webhooks.timeout_s:g})")


# -- operators' side ---------------------------------------------------------------------------------------


def _write_keys(path, text: str) -> None:
    """Replace the keys file at once, as the kubelet swaps a Secret's files: a reader never sees half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _refused_everywhere(base: str, key: str) -> bool:
    fal = requests.post(f"{base}{APP}", json={"prompt": "Hi", "image_url": SMALL, "max_new_tokens": 1},
                        headers={"Authorization": f"Key {key}"}, timeout=30)
    each = requests.get(f"{base}/v1/prediction/nope", headers={"X-API-Key": key}, timeout=10)
    oai = requests.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    return [fal.status_code, each.status_code, oai.status_code] == [401, 401, 401]


def test_a_key_removed_from_the_keys_file_stops_working_and_a_bad_file_keeps_the_keys(stack, hostile_config,
                                                                                      report_cost):
    path = hostile_config.auth.keys_file
    original = path.read_text()
    assert not _refused_everywhere(stack, REVOKED_KEY)
    try:
        _write_keys(path, yaml.safe_dump([k for k in KEYS if k["key"] != REVOKED_KEY]))
        removed = time.monotonic()
        while not _refused_everywhere(stack, REVOKED_KEY):
            assert time.monotonic() - removed < KEYS_RELOAD_S + 10, "the removed key still works"
            time.sleep(0.2)
        took = time.monotonic() - removed
        victim_run(stack)  # the keys still in the file work throughout
        # A file that does not validate (a duplicate key) is not loaded: the keys before it stay.
        _write_keys(path, yaml.safe_dump([*KEYS, {"key": VICTIM_KEY, "name": "impostor"}]))
        time.sleep(KEYS_RELOAD_S + 0.5)
        victim_run(stack)
        assert _refused_everywhere(stack, REVOKED_KEY)
    finally:
        _write_keys(path, original)
    report_cost(f"hostile keys: a removed key refused by every API {took:.1f} s after the file changed "
                f"(auth.reload_interval_s {KEYS_RELOAD_S:g})")


def test_a_flood_of_readiness_probes_costs_others_little(stack, baseline, report_cost):
    codes: list[int] = []

    def probe(stop):
        with requests.Session() as s:
            while not stop.is_set():
                codes.append(s.get(f"{stack}/readyz", timeout=10).status_code)

    with abusing(probe, threads=8):
        time.sleep(1)
        compare(report_cost, "readiness probes", stack, baseline)
    report_cost(f"hostile probes: {len(codes)} /readyz answered meanwhile, all 200: {set(codes) == {200}}")
    assert set(codes) == {200}


def test_metrics_are_not_on_the_api_port(stack):
    """Their series name every key (docs/operations.md): production serves them on the Ray pods' port only."""
    assert requests.get(f"{stack}/metrics", timeout=10).status_code == 404
