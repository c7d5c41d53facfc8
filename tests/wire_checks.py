"""Is an answer clean and in its API's shape? One set of checks for every test that sends hostile bytes: the
wire corpus and the fuzz against the in-process app (tests/unit/test_wire_corpus.py, test_fuzz.py), and a live
fuzz (tests/hostile) alike. It reads only the `httpx.Response` (its `request` says what was sent), so it works
the same over a TestClient and a socket.

The rules (docs/api.md §1.2, §1.4, §2.6, §2.7, §3.2, §8.6):
- no 5xx, except a 503 where the caller allows real unavailability;
- every header one an HTTP/1.1 server can send (h11 drops the connection on a bad one: no answer at all);
- an error is JSON (strict: no NaN) in the shape of the API its path is routed to, and small (inputs are
  echoed abridged, never whole); fal's answers carry `x-fal-request-id`;
- no internals anywhere (tracebacks, `ray::`, pids, file paths, ANSI escapes) beyond what the request sent.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

INTERNALS = re.compile(r'Traceback \(most recent call last\)|ray::|pid=|/home/|/work/|\.py"|\x1b\[')
MAX_ERROR_BYTES = 32 * 1024  # an error names what was wrong; it never carries the input back whole
APP = "/fal-ai/"
# What an HTTP/1.1 server may send (names are tokens; values visible characters with inner spaces and tabs, as
# h11 checks them): on anything else uvicorn drops the connection, unanswered.
HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
HEADER_VALUE = re.compile(rb"([\x21-\x7e\x80-\xff]([\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?)?")
PLAIN_TEXT_REFUSALS = {"Invalid request", "Disallowed CORS headers"}  # the proxy's and CORS' (§1.4, §2.8)


def routed_api(method: str, path: str, headers: httpx.Headers) -> str:
    """Whose shape an answer to this request is in: fal, eachlabs, openai, or other (FastAPI's `{"detail"}`),
    by the routing rules of docs/api.md §1.2 (a proxied request by its target's path)."""
    target = headers.get("x-fal-target-url")
    if target is not None or path == "/api/fal/proxy":
        try:
            path = urlsplit(target or "").path or "/"
        except ValueError:
            path = "/"
    elif path.startswith("/queue/"):
        path = path[len("/queue"):]
    if path.startswith(APP):
        return "fal"
    if (path == "/v1/chat/completions" and method == "POST") or (
            (path == "/v1/models" or path.startswith("/v1/models/")) and method == "GET"):
        return "openai"
    if path.startswith("/v1/"):
        return "eachlabs"  # every other path and method under /v1/ (§1.2)
    return "other"


def is_fal_request(path: str, headers: httpx.Headers) -> bool:
    """fal's dispatcher marks it: every answer then carries x-fal-request-id (§1.2, §2.6)."""
    return ("x-fal-target-url" in headers or path == "/api/fal/proxy" or path.startswith("/queue/")
            or headers.get("host", "").lower().startswith("queue.") or path.startswith(APP))


def _no_nan(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(data: bytes) -> Any:
    """JSON as a client reads it, refusing what JSON is not (NaN, Infinity); too deep raises RecursionError."""
    return json.loads(data, parse_constant=_no_nan)


def sent_text(request: httpx.Request) -> str:
    """Everything the request carried, as text: what an answer may echo back without leaking anything."""
    try:
        body = request.content
    except Exception:  # a streamed body, not read (httpx or httpx2: Starlette's TestClient prefers the latter)
        body = b""
    parts = [unquote(request.url.raw_path.decode("latin-1")), body.decode("latin-1")]
    try:
        parts.append(body.decode("utf-8"))
        parts.append(json.dumps(strict_json(body)))  # an echo is re-encoded: \u escapes, spacing
    except (ValueError, RecursionError):
        pass
    parts += [value.decode("latin-1") for _, value in request.headers.raw]
    return "\n".join(parts)


def _error_shape(api: str, request: httpx.Request, resp: httpx.Response, body: Any) -> list[str]:
    found = []
    if api == "fal":
        if request.method == "PUT" and request.url.path.endswith("/cancel") and set(body) == {"status"}:
            return [] if isinstance(body["status"], str) else ["fal cancel: status is not a string"]
        detail = body.get("detail") if isinstance(body, dict) else None
        if not (isinstance(body, dict) and set(body) <= {"detail", "error_type"} and isinstance(detail, (str, list))):
            return [f"not fal's shape: {str(body)[:200]}"]
        if isinstance(detail, list):
            for item in detail:
                if not (isinstance(item, dict) and isinstance(item.get("loc"), list)
                        and isinstance(item.get("msg"), str) and isinstance(item.get("type"), str)):
                    found.append(f"not a fal field error: {str(item)[:200]}")
        if "error_type" in body and resp.headers.get("x-fal-error-type") != body["error_type"]:
            found.append("fal error_type without the same x-fal-error-type")
    elif api == "eachlabs":
        if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str)):
            found.append(f"not Eachlabs' shape: {str(body)[:200]}")
    elif api == "openai":
        err = body.get("error") if isinstance(body, dict) else None
        if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(err, dict)
                and set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
                and isinstance(err["type"], str) and all(err[k] is None or isinstance(err[k], str)
                                                         for k in ("param", "code"))):
            found.append(f"not OpenAI's shape: {str(body)[:200]}")
    elif not (isinstance(body, dict) and isinstance(body.get("detail"), (str, list))):
        found.append(f"not FastAPI's shape: {str(body)[:200]}")
    return found


def problems(resp: httpx.Response, *, unavailable_ok: bool = False) -> list[str]:
    """What is wrong with this answer (an empty list: nothing)."""
    request = resp.request
    path = unquote(request.url.raw_path.decode("latin-1").split("?", 1)[0])
    found = []
    code = resp.status_code
    if code >= 500 and not (code == 503 and unavailable_ok):
        found.append(f"status {code}")
    for name, value in resp.headers.raw:
        if not (HEADER_NAME.fullmatch(name) and HEADER_VALUE.fullmatch(value)):
            found.append(f"a header no HTTP/1.1 server can send ({name!r}: {value[:100]!r}): the connection "
                         "would drop unanswered")
    fal = is_fal_request(path, request.headers)
    content = resp.content
    sent = sent_text(request)
    for text in (content.decode("latin-1"), *(v.decode("latin-1") for _, v in resp.headers.raw)):
        leaked = {m.group(0) for m in INTERNALS.finditer(text)} - {m.group(0) for m in INTERNALS.finditer(sent)}
        if leaked:
            found.append(f"internals in the answer: {sorted(leaked)}")
    if code < 400 or request.method == "HEAD":
        if resp.headers.get("content-type", "").startswith("application/json") and request.method != "HEAD":
            try:
                strict_json(content)
            except ValueError as exc:
                found.append(f"a {code} that is not JSON: {exc}")
        return found
    ctype = resp.headers.get("content-type", "")
    if ctype.startswith("text/plain") and code == 400 and content.decode("latin-1") in PLAIN_TEXT_REFUSALS:
        return found  # documented plain-text refusals; the proxy's has no request id (§2.8)
    if fal and "x-fal-request-id" not in resp.headers:
        found.append("a fal answer without x-fal-request-id")
    if len(content) > MAX_ERROR_BYTES:
        found.append(f"an error of {len(content)} bytes: inputs echoed whole?")
    if not ctype.startswith("application/json"):
        return found + [f"an error that is not JSON ({ctype!r}): {content[:200]!r}"]
    try:
        body = strict_json(content)
    except ValueError as exc:
        return found + [f"an error that is not JSON ({exc}): {content[:200]!r}"]
    return found + _error_shape(routed_api(request.method, path, request.headers), request, resp, body)


def assert_clean(resp: httpx.Response, *, unavailable_ok: bool = False) -> None:
    found = problems(resp, unavailable_ok=unavailable_ok)
    assert not found, f"{resp.request.method} {resp.request.url} -> {resp.status_code}: {found}\n{resp.text[:500]}"


FAL_TERMINAL = "COMPLETED"
EACHLABS_TERMINAL = ("success", "error", "cancelled")


def _read(client: httpx.Client, url: str, headers: dict[str, str], unavailable_ok: bool) -> httpx.Response:
    """One read, checked; a 429 of the key's read budget (§4.2) is waited out as its Retry-After says. A URL
    the answer built from the Host the request claimed (a queue.* host, §2.5.1) is read from the client's own
    server, with that Host."""
    target = httpx.URL(url)
    if target.is_absolute_url and target.host != client.base_url.host:
        url, headers = target.raw_path.decode("ascii"), {**headers, "Host": target.netloc.decode("ascii")}
    while True:
        resp = client.get(url, headers=headers)
        assert_clean(resp, unavailable_ok=unavailable_ok)
        if resp.status_code != 429:
            return resp
        time.sleep(float(resp.headers["retry-after"]))


def follow_job(client: httpx.Client, accepted: httpx.Response, headers: dict[str, str], *, timeout: float = 10.0,
               unavailable_ok: bool = False) -> httpx.Response:
    """Read an accepted job (a fal submit's answer, or an Eachlabs create's) as its owner until it is terminal,
    every answer checked: nothing accepted may become unreadable. Returns fal's result answer, or the
    terminal prediction."""
    body = accepted.json()
    deadline = time.monotonic() + timeout
    if "status_url" in body:  # fal (§2.5): poll its own status_url, then its response_url
        url = body["status_url"]
        while True:
            resp = _read(client, url, headers, unavailable_ok)
            assert resp.status_code in (200, 202), resp.text
            if resp.json()["status"] == FAL_TERMINAL:
                break
            assert time.monotonic() < deadline, f"fal job {body['request_id']} never completed"
            time.sleep(0.01)
        resp = _read(client, body["response_url"], headers, unavailable_ok)
        assert resp.status_code != 404, resp.text
        return resp
    url = f"/v1/prediction/{body['predictionID']}"  # Eachlabs (§3.3): always 200 for its owner
    while True:
        resp = _read(client, url, headers, unavailable_ok)
        assert resp.status_code == 200, resp.text
        if resp.json()["status"] in EACHLABS_TERMINAL:
            return resp
        assert time.monotonic() < deadline, f"prediction {body['predictionID']} never ended"
        time.sleep(0.01)
