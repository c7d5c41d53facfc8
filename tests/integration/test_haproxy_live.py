"""Production's ingress (`http.proxy: haproxy`): Ray's HAProxy and Serve's throughput mode, through
`llava-serve run` on its own local Ray (the rest of the suite's stack runs Serve's own proxy), with
production's environment (`ray_env`) in every process, `llava-serve run`'s own included, as the RayService
sets it on every Ray pod: the process that builds the application decides how its handles call.

fal's Python client runs a queue job (submit, status polls, result) and a sync run through HAProxy, with
a wide image, and sync and streamed runs with a full-HD photo: decoded pixels of more than gRPC's default
4 MiB message cap, which `ray_env` raises (docs/architecture.md, "Engine"). Sync requests whose clients hang
up stop generating within a second, measured by vLLM's own token counters.
"""

from __future__ import annotations

import io
import json
import socket
import sys
import time
from urllib.parse import urlsplit

import fal_client
import fal_client.client as fal_module
import pytest
import requests
import yaml
from PIL import Image

from serve.config import parse_config
from serve.deployment import ray_env
from serve.engine.tiny_model import IMAGE_SEQ_LENGTH
from tests.conftest import CONFIGS, LOCAL_KEY, ROOT, data_uri, free_port
from tests.integration.conftest import exchange

sys.path.insert(0, str(ROOT / "loadtest"))
import stack as loadtest_stack  # noqa: E402
import workload  # noqa: E402

APP = "fal-ai/llavav15-13b"


@pytest.fixture(scope="module")
def haproxy_stack(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("haproxy")
    data = yaml.safe_load((CONFIGS / "local-cpu.yaml").read_text())
    data["model"]["source"] = str(tiny_model_dir)
    data["http"]["proxy"] = "haproxy"
    port = free_port()
    data["http"]["public_base_url"] = f"http://127.0.0.1:{port}"  # required with haproxy: where clients reach it
    data["telemetry"]["metrics_report_interval_s"] = 0.5  # vLLM's counters on /metrics within half a second
    config = work / "haproxy.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = parse_config(data, CONFIGS, env={})
    assert cfg.http.proxy == "haproxy"
    with open(work / "server.log", "w") as log, \
            loadtest_stack.llava_serve(config, port, CONFIGS / "keys.local.yaml", log=log, env=ray_env(cfg)) as url:
        yield url


@pytest.fixture
def fal(haproxy_stack, monkeypatch):
    monkeypatch.setattr(fal_module, "RUN_URL_FORMAT", f"{haproxy_stack}/")
    monkeypatch.setattr(fal_module, "QUEUE_URL_FORMAT", f"{haproxy_stack}/queue/")
    return fal_client.SyncClient(key=LOCAL_KEY)


def panorama() -> str:
    # 8000x1000 decodes, after the bounded downscale, to 5376x672 RGB: 10.8 MB of pixels cross to the
    # engine. A gradient keeps the JPEG small.
    img = Image.linear_gradient("L").resize((8000, 1000)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return fal_client.encode(buf.getvalue(), "image/jpeg")


def test_a_queue_job_and_a_sync_run_through_haproxy(fal, haproxy_stack):
    args = {"prompt": "What is in this picture?", "image_url": panorama(), "max_new_tokens": 8}
    updates = []
    out = fal.subscribe(APP, arguments=args, with_logs=True, on_queue_update=updates.append)
    assert out["partial"] is False and out["stats"]["num_output_tokens"] == 8
    assert out["stats"]["num_input_tokens"] > IMAGE_SEQ_LENGTH
    assert any(isinstance(u, fal_client.Completed) for u in updates)  # status polls answered through HAProxy
    ran = fal.run(APP, arguments=args)
    assert ran["stats"] == out["stats"]


def full_hd_photo() -> str:
    """A 1920x1080 JPEG: not reduced by the intake (its short edge is under 2 x 672), so its 6.2 MB of
    pixels go to the engine as they are."""
    return workload.data_uri(workload.photo((1920, 1080), 1))


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
def test_a_full_hd_photo_is_answered_through_haproxy(fal, stream):
    args = {"prompt": "What is in this picture?", "image_url": full_hd_photo(), "max_new_tokens": 8}
    last = list(fal.stream(APP, arguments=args))[-1] if stream else fal.run(APP, arguments=args)  # raises on non-2xx
    assert last["partial"] is False and last["stats"]["num_output_tokens"] == 8


def test_bad_input_keeps_the_apis_shape_through_haproxy(haproxy_stack):
    r = requests.post(f"{haproxy_stack}/{APP}", json={"prompt": "hi", "image_url": "data:image/png;base64,AAAA"},
                      headers={"Authorization": f"Key {LOCAL_KEY}"}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image_url"]


def test_an_oversized_body_is_refused_through_haproxy_before_it_is_sent(haproxy_stack):
    """The body cap (docs/api.md §1.4) holds on the production path too: HAProxy streams the request to the
    ingress replica's own server, which answers 413 from the Content-Length alone."""
    cap = parse_config(yaml.safe_load((CONFIGS / "local-cpu.yaml").read_text()), CONFIGS, env={}).http.max_body_bytes
    head = (f"POST /queue/{APP} HTTP/1.1\r\nHost: {haproxy_stack.split('//')[1]}\r\n"
            f"Authorization: Key {LOCAL_KEY}\r\nContent-Type: application/json\r\nContent-Length: {cap + 1}\r\n\r\n")
    status, body, seconds = exchange(haproxy_stack, head)
    assert status == 413 and body["error_type"] == "request_too_large", body
    assert seconds < 2, f"{seconds:.2f} s to the 413"


def vllm_tokens(base: str) -> float:
    """vLLM's own counter of the tokens it generated, summed over engine replicas."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(requests.get(f"{base}/metrics", timeout=30).text)
               for sample in family.samples if sample.name == "ray_vllm_generation_tokens_total")


LONG = 2048  # tokens each abandoned request asks for: far more than it generates before its client leaves
CLIENTS = 20  # past the engine's batch (max_num_seqs 16): some generate, some wait in vLLM's queue


def test_sync_requests_whose_clients_hang_up_stop_generating_within_a_second(haproxy_stack):
    """Clients that give up (their socket closed, as a timed-out HTTP client does) under a saturated engine: each
    generation stops in vLLM within a second of the hang-up, running or waiting. Measured by vLLM's token counter:
    its value read one second after the clients left (exported every half second, so at most that old) is its
    final one: no token came after it."""
    url = urlsplit(haproxy_stack)
    body = json.dumps({"prompt": "Describe the picture in detail.", "image_url": data_uri(),
                       "max_new_tokens": LONG, "temperature": 0}).encode()
    head = (f"POST /{APP} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Key {LOCAL_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    before = vllm_tokens(haproxy_stack)
    socks = []
    for _ in range(CLIENTS):
        sock = socket.create_connection((url.hostname, url.port), timeout=30)
        sock.sendall(head + body)
        socks.append(sock)
    sent = time.monotonic()
    try:
        deadline = sent + 60
        while vllm_tokens(haproxy_stack) < before + 16 * 20 and time.monotonic() < deadline:
            time.sleep(0.2)  # until the batch is generating
    finally:
        for sock in socks:
            sock.close()  # FIN, as a client that times out closes its connection
    left = time.monotonic()
    time.sleep(max(0.0, left + 1.0 - time.monotonic()))
    at_one_second = vllm_tokens(haproxy_stack)
    time.sleep(3.0)  # six exports: a generation still running would move the counter
    final = vllm_tokens(haproxy_stack)
    print(f"haproxy hang-ups: {CLIENTS} clients left {left - sent:.1f} s in; vLLM generated {final - before:.0f} "
          f"tokens for them ({LONG * CLIENTS} asked), {final - at_one_second:.0f} of them later than a second after "
          "the clients left")
    assert final - before >= 16 * 20, "the engine never got going"
    assert final == at_one_second, "a generation went on past a second after its client left"
