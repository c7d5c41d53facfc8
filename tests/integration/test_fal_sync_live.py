"""fal's synchronous run through the whole real path: HTTP -> Serve ingress -> LLMServer -> vLLM (CPU)."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import fal_client
import fal_client.client
import pytest
import requests
from transformers import AutoTokenizer

from serve.api.chat import single_turn
from serve.engine.tiny_model import IMAGE_SEQ_LENGTH
from tests.conftest import LOCAL_KEY, data_uri
from tests.integration.conftest import wait_for_abort

APP = "fal-ai/llavav15-13b"
AUTH = {"Authorization": f"Key {LOCAL_KEY}"}


def run(base, timeout=120, **kw):
    body = {"prompt": "What is in this picture?", "image_url": data_uri(), "temperature": 0, **kw}
    return requests.post(f"{base}/{APP}", json=body, headers=AUTH, timeout=timeout)


def expected_input_tokens(model_dir, cfg, prompt):
    # The templated prompt's tokens (BOS included) with the one <image> token expanded to 576.
    tok = AutoTokenizer.from_pretrained(model_dir)
    return len(tok(single_turn(prompt)).input_ids) - 1 + IMAGE_SEQ_LENGTH


def test_answer_with_token_counts_including_image_tokens(stack, stack_config, tiny_model_dir):
    resp = run(stack, max_new_tokens=12)
    assert resp.status_code == 200, resp.text
    uuid.UUID(resp.headers["x-fal-request-id"])
    out = resp.json()
    assert out["partial"] is False
    assert out["stats"] == {
        "num_input_tokens": expected_input_tokens(tiny_model_dir, stack_config, "What is in this picture?"),
        "num_output_tokens": 12,
    }
    assert len(out["output"]) == 12  # the tiny model's greedy tokens are one ASCII character each


@pytest.mark.parametrize("field, n", [("max_new_tokens", 1), ("max_new_tokens", 37), ("max_tokens", 5)])
def test_max_new_tokens_is_honoured(stack, field, n):
    out = run(stack, **{field: n}).json()
    assert out["stats"]["num_output_tokens"] == n and len(out["output"]) == n


def test_greedy_is_deterministic_and_the_image_reaches_the_model(stack):
    a1 = run(stack, max_new_tokens=24).json()["output"]
    a2 = run(stack, max_new_tokens=24).json()["output"]
    other = run(stack, max_new_tokens=24, image_url=data_uri((300, 200), "JPEG", (20, 220, 90))).json()["output"]
    assert a1 == a2
    assert other != a1


def test_prompt_longer_than_the_context_is_a_422(stack):
    resp = run(stack, prompt="x" * 5000)  # one token per byte: past max_model_len 4096
    assert resp.status_code == 422, resp.text
    item = resp.json()["detail"][0]
    assert item["loc"] == ["body", "prompt"] and "4096" in item["msg"]
    # In plain words, not the engine replica's traceback as Ray wraps it (pids, addresses, file paths, ANSI).
    # vLLM words it in one of a few ways (serve/engine/vllm_engine.py `refused` rewrites the one that isn't plain).
    assert "context" in item["msg"] and "prompt" in item["msg"], item["msg"]
    assert not re.search(r"ray::|pid=|Traceback|\.py|\x1b\[|max_model_len", resp.text), resp.text


def test_concurrent_requests_are_batched(stack, engine_stats):
    n, tokens = 8, 256
    t0 = time.perf_counter()
    assert run(stack, max_new_tokens=tokens).status_code == 200
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: run(stack, max_new_tokens=tokens), range(n)))
    together = time.perf_counter() - t0
    print(f"\nbatching: 1 request {one:.2f} s, {n} concurrent {together:.2f} s ({together / one:.1f}x one)")
    assert all(r.status_code == 200 for r in results)
    assert all(r.json()["stats"]["num_output_tokens"] == tokens for r in results)
    # All n were inside the engine at once (Serve's max_ongoing_requests let them through) ...
    assert engine_stats()["peak_running"] >= n
    # ... and continuous batching made that pay: far less than n sequential requests' time.
    assert together < n * one / 2


def test_client_disconnect_aborts_the_engine_request(stack, engine_stats):
    before = engine_stats()
    body = json.dumps({"prompt": "What is in this picture?", "image_url": data_uri(), "max_new_tokens": 2048})
    head = f"POST /{APP} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n" \
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    url = urlsplit(stack)
    with socket.create_connection((url.hostname, url.port)) as conn:
        conn.sendall((head + body).encode())
        deadline = time.monotonic() + 30
        while engine_stats()["running"] == before["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine_stats()["running"] == before["running"] + 1  # mid-generation when the client leaves
    now = wait_for_abort(engine_stats, before)
    assert now["aborted"] == before["aborted"] + 1, now
    assert now["running"] == 0 and now["finished"] == before["finished"], now


def test_ready(stack):
    assert requests.get(f"{stack}/readyz", timeout=10).json() == {"status": "ready"}
    assert requests.get(f"{stack}/healthz", timeout=10).json() == {"status": "ok"}


def test_a_saturated_engine_is_still_ready(stack, stack_config, engine_stats):
    # More long requests than the engine batches at once: the rest wait in vLLM's own queue (the engine
    # deployment's max_ongoing_requests lets them all through), where a freed sequence is refilled at once.
    batch = stack_config.engine.max_num_seqs
    assert stack_config.engine_max_ongoing_requests() >= batch + 4
    with ThreadPoolExecutor(batch + 4) as pool:
        pending = [pool.submit(run, stack, max_new_tokens=2048, timeout=6.0) for _ in range(batch + 4)]
        time.sleep(2.0)
        t0 = time.perf_counter()
        ready = requests.get(f"{stack}/readyz", timeout=3)
        print(f"\nreadyz under saturation: {1000 * (time.perf_counter() - t0):.0f} ms")
        busy = sum(not f.done() for f in pending)
        inside = engine_stats()["running"]  # a call to the engine no longer queues behind a full batch
        outcomes = [f.exception() or f.result().status_code for f in pending]
    assert ready.status_code == 200, ready.text
    assert busy == batch + 4  # every request was still in flight when readiness was asked
    assert inside == batch + 4  # all inside the engine: the batch full, the rest in vLLM's queue
    # Each then timed out on the client's side, or (a fast machine, an early end of text) was answered.
    assert all(isinstance(o, requests.Timeout) or o == 200 for o in outcomes), outcomes
    assert wait_for_abort(engine_stats, {"aborted": 0})["running"] == 0


def test_real_python_fal_client(stack, monkeypatch):
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{stack}/")
    client = fal_client.SyncClient(key=LOCAL_KEY)
    out = client.run(APP, arguments={"prompt": "Describe", "image_url": data_uri(), "max_new_tokens": 8})
    assert out["partial"] is False and out["stats"]["num_output_tokens"] == 8 and len(out["output"]) == 8
    with pytest.raises(fal_client.client.FalClientHTTPError) as exc:
        client.run(APP, arguments={"image_url": data_uri()})
    assert exc.value.status_code == 422
    assert exc.value.response.json()["detail"][0]["loc"] == ["body", "prompt"]
