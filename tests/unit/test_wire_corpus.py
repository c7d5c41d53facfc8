"""The wire corpus (issue "every byte a client sends answered in shape"): one case per hostile request that was
once answered wrong — a 500, an answer that could not be sent, a job accepted that could not be read back —
named after what it was. Each is now answered in its API's shape (tests/wire_checks.py), and anything accepted
reads back to a terminal state. A new finding of the fuzz (test_fuzz.py) or of a live run becomes a case here.

Real app, job runner and store, fake engine, no Ray; the path cases also over a real socket (uvicorn), where
a bad header made the server drop the connection unanswered.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from serve.api.body import MAX_DEPTH
from serve.api.eachlabs.serving import EachlabsExecutor
from serve.api.fal.serving import FalExecutor
from serve.config import JobsConfig
from serve.ingress import create_app
from serve.jobs.runner import JobRunner
from tests.conftest import LOCAL_KEY, data_uri, free_port
from tests.fakes import FakeEngine, make_services
from tests.wire_checks import assert_clean, follow_job

APP = "/fal-ai/llavav15-13b"
FAL = {"Authorization": f"Key {LOCAL_KEY}", "Content-Type": "application/json"}
EACH = {"X-API-Key": "local-each-key", "Content-Type": "application/json"}
OPENAI = {"Authorization": f"Bearer {LOCAL_KEY}", "Content-Type": "application/json"}
FAST = JobsConfig(lease_s=3.0, outage_after_s=1.0, runner_retry_s=0.01, reap_interval_s=0.1)
IMAGE = data_uri()
BIG_BAD_IMAGE = "data:image/png;base64," + "A" * 200_000  # not an image, and too long to echo


def fal(fields: str) -> bytes:
    """A fal input with raw JSON `fields` spliced in (what json.dumps cannot write: NaN, "\\ud800")."""
    return f'{{"prompt": "hi", "image_url": "{IMAGE}", "max_new_tokens": 2{fields}}}'.encode()


def each(fields: str, prompt: str = '"hi"') -> bytes:
    inp = f'{{"image": "{IMAGE}", "prompt": {prompt}, "max_tokens": 2{fields}}}'
    return f'{{"model": "llava-13b", "input": {inp}}}'.encode()


def chat(fields: str, content: str = '"hi"') -> bytes:
    return (f'{{"model": "tiny-llava", "max_tokens": 2, "messages": [{{"role": "user", "content": {content}}}]'
            f'{fields}}}').encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None
    status: int  # what it is answered now
    was: str  # what it was answered before
    checks: tuple = field(default=())  # more checks on the answer (callables)


def small(limit: int = 4096):
    def check(resp: httpx.Response) -> None:
        assert len(resp.content) < limit and "A" * 300 not in resp.text, resp.text[:500]
    return check


def invalid_json(resp: httpx.Response) -> None:
    """Refused as the body's parse failed, in each API's words for invalid JSON."""
    body = resp.json()
    if "detail" in body:
        assert body["detail"][0]["type"] == "json_invalid" and body["detail"][0]["input"] == {}, body
    elif isinstance(body["error"], dict):
        assert "not valid JSON" in body["error"]["message"], body
    else:
        assert body == {"error": "Invalid request body"}, body


SUBMIT = f"/queue{APP}"
CASES: dict[str, Case] = {
    # 1. Non-finite numbers: Python's json (and pydantic's lax parse) take them, JSON does not. fal's 422 echoed
    #    the NaN and could not be serialised (500, plain text); the queue stored it.
    "fal_sync_nan_temperature_was_500_plain_text": Case(
        "POST", APP, FAL, fal(', "temperature": NaN'), 422, "500 text/plain", (invalid_json,)),
    "fal_sync_infinity_top_p_was_500_plain_text": Case(
        "POST", APP, FAL, fal(', "top_p": Infinity'), 422, "500 text/plain", (invalid_json,)),
    "fal_sync_minus_infinity_was_500_plain_text": Case(
        "POST", APP, FAL, fal(', "temperature": -Infinity'), 422, "500 text/plain", (invalid_json,)),
    "fal_queue_nan_temperature_was_500_plain_text": Case(
        "POST", SUBMIT, FAL, fal(', "temperature": NaN'), 422, "500 text/plain", (invalid_json,)),
    "fal_queue_nan_in_an_ignored_field_was_accepted": Case(
        "POST", SUBMIT, FAL, fal(', "seed": NaN'), 422, "200, stored", (invalid_json,)),
    "fal_queue_overflowing_number_was_accepted": Case(
        "POST", SUBMIT, FAL, fal(', "temperature": 1e999'), 422, "422 echoing Infinity: 500", (invalid_json,)),
    "eachlabs_nan_top_p_was_accepted_as_json": Case(
        "POST", "/v1/prediction/", EACH, each(', "top_p": NaN'), 400, "400 from the model", (invalid_json,)),
    "eachlabs_infinity_in_an_ignored_field_was_accepted": Case(
        "POST", "/v1/prediction/", EACH, each(', "seed": Infinity'), 400, "200, stored", (invalid_json,)),
    "eachlabs_string_infinity_temperature_was_accepted": Case(
        "POST", "/v1/prediction/", EACH, each(', "temperature": "Infinity"'), 400, "200, engine got inf"),
    "eachlabs_huge_integer_was_accepted": Case(
        "POST", "/v1/prediction/", EACH, each(', "max_tokens": 1' + "0" * 400), 400,
        "200, stored: past a double's range, which JSON readers but Python's (Redis' cjson) read as inf",
        (invalid_json,)),
    "openai_nan_in_an_ignored_field_was_accepted": Case(
        "POST", "/v1/chat/completions", OPENAI, chat(', "user": NaN'), 400, "200", (invalid_json,)),
    "openai_overflowing_temperature_was_a_range_error": Case(
        "POST", "/v1/chat/completions", OPENAI, chat(', "temperature": -1e400'), 400, "400 naming Infinity",
        (invalid_json,)),
    # 2. Deep nesting: Python's json recursed until RecursionError (Eachlabs 500); pydantic's parser stops at
    #    ~200 levels; now every API refuses past MAX_DEPTH.
    "eachlabs_100000_brackets_was_500_recursion_error": Case(
        "POST", "/v1/prediction/", EACH, b"[" * 100_000, 400, "500", (invalid_json,)),
    "eachlabs_deep_input_field_was_500_recursion_error": Case(
        "POST", "/v1/prediction/", EACH, each(', "x": ' + nested(100_000)), 400, "500", (invalid_json,)),
    "eachlabs_nesting_past_the_bound": Case(
        "POST", "/v1/prediction/", EACH, each(', "x": ' + nested(MAX_DEPTH)), 400, "200", (invalid_json,)),
    "fal_100000_brackets_echoed_the_body": Case(
        "POST", APP, FAL, b"[" * 100_000, 422, "422 echoing the whole body", (invalid_json, small())),
    "fal_queue_nesting_past_the_bound": Case(
        "POST", SUBMIT, FAL, fal(', "x": ' + nested(MAX_DEPTH)), 422, "200", (invalid_json,)),
    # 3. Lone surrogates: legal JSON escapes Python's json decodes into a str no UTF-8 encoder takes. An
    #    Eachlabs prediction was accepted, then every read of it failed (500) for as long as it lived.
    "eachlabs_lone_high_surrogate_prompt_was_accepted_then_unreadable": Case(
        "POST", "/v1/prediction/", EACH, each("", prompt='"\\ud800"'), 400, "200, then 500 on every get",
        (invalid_json,)),
    "eachlabs_lone_low_surrogate_prompt_was_accepted_then_unreadable": Case(
        "POST", "/v1/prediction/", EACH, each("", prompt='"a\\udfff"'), 400, "200, then 500 on every get",
        (invalid_json,)),
    "eachlabs_lone_surrogate_in_a_key_was_accepted": Case(
        "POST", "/v1/prediction/", EACH, each(', "\\ud800": 1'), 400, "200", (invalid_json,)),
    "eachlabs_lone_surrogate_in_version_was_accepted_then_unreadable": Case(
        "POST", "/v1/prediction/", EACH, each("")[:-1] + b', "version": "\\udc00"}', 400,
        "200, then 500 on every get", (invalid_json,)),
    "fal_queue_lone_surrogate_echoed_the_body": Case(
        "POST", SUBMIT, FAL, b'{"prompt": "\\ud800", "image_url": "' + IMAGE.encode() + b'"}', 422,
        "422 echoing the whole body", (invalid_json, small())),
    # Not failures: a surrogate *pair* is a character, accepted, and it reads back.
    "eachlabs_surrogate_pair_prompt_reads_back": Case(
        "POST", "/v1/prediction/", EACH, each("", prompt='"\\ud83d\\ude00"'), 200, "200"),
    "fal_queue_surrogate_pair_prompt_reads_back": Case(
        "POST", SUBMIT, FAL, b'{"prompt": "\\ud83d\\ude00", "max_new_tokens": 2, "image_url": "'
        + IMAGE.encode() + b'"}', 200, "200"),
    # 5. Echoes: fal's 422 echoed inputs whole (a data: URI of megabytes, a whole body).
    "fal_unusable_data_uri_echoed_whole": Case(
        "POST", APP, FAL, json.dumps({"prompt": "hi", "image_url": BIG_BAD_IMAGE}).encode(), 422,
        "422 echoing 200 kB", (small(),)),
    "fal_missing_prompt_echoed_the_whole_body": Case(
        "POST", APP, FAL, json.dumps({"image_url": BIG_BAD_IMAGE, "x": list(range(10_000))}).encode(), 422,
        "422 echoing the body", (small(),)),
    "fal_long_start_timeout_header_echoed_whole": Case(
        "POST", APP, {**FAL, "X-Fal-Request-Timeout": "A" * 6000}, fal(""), 422, "422 echoing it", (small(),)),
    "fal_long_webhook_echoed_whole": Case(
        "POST", f"{SUBMIT}?fal_webhook=ftp://{'A' * 6000}", FAL, fal(""), 422, "422 echoing it", (small(),)),
    # A secret sent back as a header: with a newline or a non-ASCII character no delivery could carry it.
    "eachlabs_webhook_secret_with_a_newline_could_never_be_sent": Case(
        "POST", "/v1/prediction/", EACH, each("")[:-1] + b', "webhook_url": "http://127.0.0.1:1/h", '
        b'"webhook_secret": "a\\nX-Evil: 1"}', 400, "200; no delivery could carry it"),
    "eachlabs_non_ascii_webhook_secret_could_never_be_sent": Case(
        "POST", "/v1/prediction/", EACH, each("")[:-1] + b', "webhook_url": "http://127.0.0.1:1/h", '
        b'"webhook_secret": "\\u00e9t\\u00e9"}', 400, "200; every delivery raised (httpx sends ASCII)"),
    # Methods the /v1 catch-all did not list: FastAPI's 405 {"detail"} instead of Eachlabs' shape.
    "eachlabs_options_was_fastapi_405": Case("OPTIONS", "/v1/prediction/x", {}, None, 404, "405 {detail}"),
    "eachlabs_trace_was_fastapi_405": Case("TRACE", "/v1/prediction", {}, None, 404, "405 {detail}"),
    "openai_route_options_was_fastapi_405": Case("OPTIONS", "/v1/models", OPENAI, None, 404, "405 {detail}"),
    # A decoded %0a stopped Starlette's `path` convertor: past the API's catch-all to FastAPI's 404.
    "eachlabs_path_with_a_newline_was_fastapi_404": Case("GET", "/v1/abc%0d%0aX-Evil:%201", EACH, None, 404,
                                                         "404 {detail}"),
    "openai_model_id_with_a_newline_was_fastapi_404": Case("GET", "/v1/models/a%0ab", OPENAI, None, 404,
                                                           "404 {detail}"),
}

# 4. A job id from the path went into x-fal-request-id as sent: %00, %0a, %0d%0a made h11 (uvicorn) drop the
#    connection with no answer; a character outside Latin-1 could not be encoded at all. Every fal route that
#    takes an id, with and without /queue (Eachlabs puts no id in a header; the fuzz covers its routes).
DROPPED = "no answer: h11 refused the header"
BAD_IDS = {  # name: (the id, as sent in the path; what it was answered)
    "nul_dropped_the_connection": ("abc%00", DROPPED), "lf_dropped_the_connection": ("abc%0a", DROPPED),
    "crlf_dropped_the_connection": ("abc%0d%0a", DROPPED),
    "header_injection_dropped_the_connection": ("abc%0d%0aX-Evil:%201", DROPPED),
    "non_latin1_was_500": ("%E2%82%AC", "500 text/plain: the header could not be encoded"),
    "invalid_utf8_was_500": ("%ff", "500 text/plain: decoded to U+FFFD, which Latin-1 cannot encode"),
}
ID_ROUTES = {
    "fal_status": ("GET", APP + "/requests/{}/status", FAL, 404),
    "fal_queue_status": ("GET", f"/queue{APP}/requests/{{}}/status", FAL, 404),
    "fal_queue_status_stream": ("GET", f"/queue{APP}/requests/{{}}/status/stream", FAL, 404),
    "fal_queue_result": ("GET", f"/queue{APP}/requests/{{}}", FAL, 404),
    "fal_queue_cancel": ("PUT", f"/queue{APP}/requests/{{}}/cancel", FAL, 404),
}
for route, (method, template, headers, status) in ID_ROUTES.items():
    for name, (bad, was) in BAD_IDS.items():
        CASES[f"{route}_id_{name}"] = Case(method, template.format(bad), headers, None, status, was)


@pytest.fixture(scope="module")
def client():
    services = make_services(FakeEngine())
    executors = {"fal": FalExecutor(services), "eachlabs": EachlabsExecutor(services)}
    with TestClient(create_app(services, JobRunner(services.store, "runner-1", executors, FAST)),
                    raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("name", CASES)
def test_corpus(client, name):
    case = CASES[name]
    resp = client.request(case.method, case.path, headers=case.headers, content=case.body)
    assert resp.status_code == case.status, f"{name} (was: {case.was}): {resp.status_code} {resp.text[:300]}"
    assert_clean(resp)
    for check in case.checks:
        check(resp)
    if resp.status_code == 200 and case.method == "POST":  # accepted: its owner reads it to its end
        done = follow_job(client, resp, case.headers)
        assert done.status_code == 200 and "w0" in done.text, done.text[:300]


def test_an_echo_says_what_it_cut(client):
    """fal still echoes the offending input (§2.7), abridged as reads abridge it: its head and its length."""
    resp = client.post(APP, content=json.dumps({"prompt": "hi", "image_url": BIG_BAD_IMAGE}), headers=FAL)
    echoed = resp.json()["detail"][0]["input"]
    assert echoed == f"{BIG_BAD_IMAGE[:64]}… ({len(BIG_BAD_IMAGE)} characters)"
    missing = client.post(APP, content=json.dumps({"image_url": "x", "x": list(range(10_000))}), headers=FAL)
    echoed = missing.json()["detail"][0]["input"]
    assert echoed["image_url"] == "x" and echoed["x"][-1] == "… (10000 items)" and len(echoed["x"]) < 40


@pytest.fixture(scope="module")
def live():
    """The same app behind uvicorn on a socket: the path cases' failure was a connection dropped unanswered."""
    services = make_services(FakeEngine())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(services), port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        async def started():
            while not server.started:
                await asyncio.sleep(0.02)

        asyncio.run(asyncio.wait_for(started(), 10))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("name", [n for n in CASES if "_id_" in n])
def test_bad_ids_are_answered_over_a_socket(live, name):
    case = CASES[name]
    resp = live.request(case.method, case.path, headers=case.headers)  # a dropped connection raises here
    assert resp.status_code == case.status, resp.text
    assert_clean(resp)
