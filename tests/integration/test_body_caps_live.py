"""Bodies over http.max_body_bytes on the live stack (Serve's proxy): the 413, in each API's shape, comes back
as soon as the headers are in, before a byte of a body that big is sent; a body without a length is cut off at
the cap; another key is served meanwhile. The shapes and the quota are in tests/unit/test_body_caps.py."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import LOCAL_KEY, data_uri
from tests.integration.conftest import SOLO_KEY, exchange

ROUTES = {  # path, the key's header
    "fal run": ("/fal-ai/llavav15-13b", f"Authorization: Key {LOCAL_KEY}"),
    "fal stream": ("/fal-ai/llavav15-13b/stream", f"Authorization: Key {LOCAL_KEY}"),
    "fal submit": ("/queue/fal-ai/llavav15-13b", f"Authorization: Key {LOCAL_KEY}"),
    "eachlabs create": ("/v1/prediction/", "X-API-Key: local-each-key"),
    "eachlabs run": ("/v1/prediction/run", "X-API-Key: local-each-key"),
    "openai chat": ("/v1/chat/completions", f"Authorization: Bearer {LOCAL_KEY}"),
}


@pytest.mark.parametrize("name", ROUTES)
def test_an_announced_oversized_body_is_refused_before_it_is_sent(stack, stack_config, name):
    path, key = ROUTES[name]
    cap = stack_config.http.max_body_bytes
    head = (f"POST {path} HTTP/1.1\r\nHost: {urlsplit(stack).netloc}\r\n{key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {cap + 1}\r\n\r\n")
    status, body, seconds = exchange(stack, head)  # no body at all: the answer cannot wait for it
    assert status == 413, body
    message = body.get("detail") or body.get("error")
    message = message["message"] if isinstance(message, dict) else message
    assert str(cap) in message
    assert seconds < 2, f"{seconds:.2f} s to the 413"


def test_a_body_without_a_length_is_cut_off_at_the_cap(stack, stack_config, report_cost):
    cap = stack_config.http.max_body_bytes
    path, key = ROUTES["fal run"]
    head = (f"POST {path} HTTP/1.1\r\nHost: {urlsplit(stack).netloc}\r\n{key}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = 1024 * 1024
    chunks = (f"{piece:x}\r\n".encode() + b" " * piece + b"\r\n" for _ in range(cap // piece + 8))
    status, body, seconds = exchange(stack, head, chunks, timeout=60)
    report_cost(f"body caps: {cap / 2**20:.0f} MiB chunked body refused in {seconds:.1f} s")
    assert status == 413 and body["error_type"] == "request_too_large", body


def test_another_key_is_served_while_one_sends_oversized_bodies(stack):
    path, key = ROUTES["fal submit"]
    head = (f"POST {path} HTTP/1.1\r\nHost: {urlsplit(stack).netloc}\r\n{key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {60 * 2**20}\r\n\r\n")
    for _ in range(5):
        assert exchange(stack, head)[0] == 413
    resp = requests.post(f"{stack}/fal-ai/llavav15-13b", headers={"Authorization": f"Key {SOLO_KEY}"}, timeout=60,
                         json={"prompt": "hi", "image_url": data_uri(), "max_new_tokens": 2})
    assert resp.status_code == 200 and resp.json()["stats"]["num_output_tokens"] == 2
