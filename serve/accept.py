"""`llava-serve accept` (docs/operations.md, "Acceptance check"): one run against a live deployment, over plain
HTTP, of every API it serves, its limits, health and metrics, and a short load measured against the capacity model.

Each check is a small function that returns what it saw (one line) or raises Failed / Skipped with the reason;
`run` calls them in order and gathers one Report. Every call has a timeout, and a transport failure, a wrong status
or a wrong shape is a failed row with its reason, never a traceback. The run spends at most CHECK_ADMISSIONS plus
the load's requests of the key's rate (docs/api.md §4.1), and never more than the key's budget has left.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import math
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import httpx

from serve import capacity
from serve.config import ConfigError, load_config

APP = "/fal-ai/llavav15-13b"
EACH_MODEL = "llava-13b"
PROMPT = "Describe this picture in one sentence."
CHECK_MAX_TOKENS = 16  # the functional checks' answers: enough to see text, cheap on any engine
CANCEL_MAX_TOKENS = 512  # a job that cannot finish before the cancel that follows its submit
POLL_S = 0.25  # status polls are free of the rate (docs/api.md §4.1); their read budget is 100/s
# What the functional checks admit against the key's rate: fal run, stream, two submits; two Eachlabs creates;
# one chat completion. The load adds its own requests (Options.load_requests at most).
CHECK_ADMISSIONS = 7
LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "RateLimit-Policy", "RateLimit")

PASS, FAIL, SKIP = "pass", "fail", "skip"


class Failed(Exception):
    """The check failed; the message is the reason shown."""


class Skipped(Exception):
    """The check was not asked for (OPTIONAL) or has nothing to measure against; the message says why."""


@dataclass(frozen=True)
class Options:
    url: str
    key: str
    second_key: str | None = None
    webhook_listen: tuple[str, int] | None = None  # where this process receives the deployment's webhooks
    webhook_url: str | None = None  # that receiver as the deployment reaches it
    metrics_url: str | None = None
    load_seconds: float = 5.0
    concurrency: int = 4
    load_requests: int = 30
    max_tokens: int = 64  # per load request
    timeout: float = 60.0
    min_ratio: float | None = None
    config: Path = capacity.PRODUCTION_CONFIG  # what the load is compared with (docs/capacity.md)

    def __post_init__(self):
        u = urlsplit(self.url)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ValueError(f"--url {self.url!r} is not an http(s) URL")
        if self.second_key is not None and self.second_key == self.key:
            raise ValueError("--second-key is --key: it would show nothing about separate budgets")


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str
    seconds: float

    @property
    def ok(self) -> bool | None:
        return None if self.status == SKIP else self.status == PASS


@dataclass
class Sample:
    """One load request: seconds to the first token and to the end, and its token counts."""

    started: float
    ended: float
    ttft: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


@dataclass
class Report:
    url: str
    checks: list[Check] = field(default_factory=list)
    load: dict[str, Any] | None = None  # the load's figures, the model's and their ratios
    budget: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok,
                "checks": [{"name": c.name, "status": c.status, "ok": c.ok, "detail": c.detail,
                            "seconds": round(c.seconds, 3)} for c in self.checks],
                "load": self.load, "budget": self.budget}


# --- output ------------------------------------------------------------------------------------------------

NAME_WIDTH = 18


def header(url: str) -> str:
    return f"llava-serve accept: {url}\n  {'result':<6}  {'check':<{NAME_WIDTH}}  {'time':>7}  detail"


def row(c: Check) -> str:
    return f"  {c.status.upper():<6}  {c.name:<{NAME_WIDTH}}  {c.seconds:>6.2f}s  {c.detail}"


def footer(report: Report) -> list[str]:
    lines = [""]
    if report.load and report.load.get("requests"):
        ld = report.load
        lines.append(f"load: {ld['requests']} requests at {ld['concurrency']} concurrent in {ld['seconds']:.1f} s, "
                     f"{ld['mean_prompt_tokens']:.0f} prompt + {ld['mean_output_tokens']:.0f} output tokens each")
        lines.append(f"  measured:  TTFT p50 {_ms(ld['ttft_p50_s'])}, p95 {_ms(ld['ttft_p95_s'])}; "
                     f"{ld['output_tokens_s']:.1f} output tokens/s; {ld['requests_s']:.2f} requests/s")
        model = ld.get("model")
        if model:
            r = ld["ratios"]
            lines.append(f"  one L40S replica (docs/capacity.md) at {ld['concurrency']} concurrent: TTFT >= "
                         f"{_ms(model['ttft_s'])} (prefill); {model['output_tokens_s']:.1f} output tokens/s; "
                         f"{model['requests_s']:.2f} requests/s")
            lines.append(f"  ratio (above 1 is better than the model): TTFT {r['ttft']:.2f}, "
                         f"output tokens/s {r['output_tokens_s']:.2f}, requests/s {r['requests_s']:.2f}")
    failed = [c.name for c in report.checks if c.status == FAIL]
    skipped = sum(c.status == SKIP for c in report.checks)
    passed = sum(c.status == PASS for c in report.checks)
    if failed:
        lines.append(f"FAILED: {len(failed)} of {len(report.checks)} checks failed: {', '.join(failed)}")
    else:
        lines.append(f"ACCEPTED: {passed} checks passed, {skipped} skipped")
    return lines


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.0f} ms"


# --- HTTP ----------------------------------------------------------------------------------------------------


def _snippet(text: str, limit: int = 160) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else one[:limit] + "…"


def transport_reason(exc: httpx.HTTPError, timeout: float) -> str:
    """A transport failure in plain words, naming where it went (never the headers: they carry the key)."""
    where = ""
    try:
        u = exc.request.url
        where = f"{u.host}:{u.port or (443 if u.scheme == 'https' else 80)}{u.path}"
    except RuntimeError:  # no request attached
        pass
    if isinstance(exc, httpx.ConnectTimeout):
        return f"no connection to {where} within {timeout:g} s"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {where}: {exc}"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer from {where} within {timeout:g} s"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"{where} broke the connection: {exc}"
    return f"{type(exc).__name__} from {where}: {exc}"


def status_reason(r: httpx.Response, expected: tuple[int, ...]) -> str:
    want = " or ".join(str(s) for s in expected)
    return f"HTTP {r.status_code} from {r.request.method} {r.request.url.path} (expected {want}): {_snippet(r.text)}"


def json_of(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        raise Failed(f"{r.request.method} {r.request.url.path} answered {r.status_code} with no JSON: "
                     f"{_snippet(r.text) or '(empty body)'}") from None


def need(cond: bool, reason: str) -> None:
    if not cond:
        raise Failed(reason)


def field_of(obj: Any, name: str, kind: type, where: str) -> Any:
    need(isinstance(obj, dict), f"{where}: expected a JSON object, got {_snippet(json.dumps(obj))}")
    need(name in obj, f"{where}: no '{name}' in {_snippet(json.dumps(obj))}")
    need(isinstance(obj[name], kind) and not (kind is int and isinstance(obj[name], bool)),
         f"{where}: '{name}' is {_snippet(json.dumps(obj[name]))}, not {kind.__name__}")
    return obj[name]


def image_data_uri() -> str:
    """A small PNG (two colours, so it is a picture and not a blank) as a data: URI (docs/api.md §2.9)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 64), (40, 120, 200))
    ImageDraw.Draw(img).ellipse((24, 8, 72, 56), fill=(230, 190, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Receiver:
    """Receives the deployment's webhooks on Options.webhook_listen: every POST's JSON body."""

    def __init__(self, listen: tuple[str, int]):
        self.calls: list[Any] = []
        self._arrived = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                with receiver._arrived:
                    receiver.calls.append(body)
                    receiver._arrived.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(listen, Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def wait(self, match: Callable[[Any], bool], deadline: float) -> Any:
        """The first body `match` takes, or None by the deadline."""
        with self._arrived:
            while True:
                for body in self.calls:
                    if match(body):
                        return body
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._arrived.wait(left)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- the run -------------------------------------------------------------------------------------------------


class Session:
    """What the checks share: the client, the image, and what earlier checks learnt."""

    def __init__(self, opts: Options, client: httpx.Client, receiver: Receiver | None):
        self.opts, self.client, self.receiver = opts, client, receiver
        self.base = opts.url.rstrip("/")
        self.image = image_data_uri()
        self.unreachable: str | None = None  # why the deployment cannot be reached at all
        self.model: str | None = None  # OpenAI's served model name
        self.limited: list[tuple[str, httpx.Headers]] = []  # (check, headers) of each admitted answer
        self.second: list[dict[str, int]] = []  # the second key's limit headers, before and after
        self.fal_job: dict | None = None
        self.prediction: str | None = None
        self.samples: list[Sample] = []
        self.figures: dict[str, Any] | None = None  # the load's, then the model's and the ratios
        self.load_cap = ""  # what bounded the load's request count

    def url(self, path: str) -> str:
        return self.base + path

    def call(self, method: str, url: str, expect: tuple[int, ...] = (200,), **kw) -> httpx.Response:
        try:
            r = self.client.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise Failed(transport_reason(exc, self.opts.timeout)) from None
        need(r.status_code in expect, status_reason(r, expect))
        return r

    def fal(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Key {key or self.opts.key}"}

    def each(self, key: str | None = None) -> dict[str, str]:
        return {"X-API-Key": key or self.opts.key}

    def bearer(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.opts.key}"}

    def fal_input(self, max_tokens: int = CHECK_MAX_TOKENS) -> dict:
        return {"prompt": PROMPT, "image_url": self.image, "max_new_tokens": max_tokens, "temperature": 0}

    def each_body(self, max_tokens: int = CHECK_MAX_TOKENS, webhook: str | None = None) -> dict:
        body: dict = {"model": EACH_MODEL, "version": "0.0.1",
                      "input": {"image": self.image, "prompt": PROMPT, "max_tokens": str(max_tokens),
                                "temperature": "0"}}
        if webhook:
            body["webhook_url"] = webhook
        return body

    def chat_body(self, max_tokens: int, stream: bool = False) -> dict:
        body: dict = {"model": self.model or "", "max_tokens": max_tokens, "temperature": 0,
                      "messages": [{"role": "user", "content": [
                          {"type": "image_url", "image_url": {"url": self.image}}, {"type": "text", "text": PROMPT}]}]}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body

    def admitted(self, check: str, r: httpx.Response) -> None:
        self.limited.append((check, r.headers))

    def remaining(self) -> int | None:
        """The key's admissions left in its window, as its latest answer said."""
        for _, h in reversed(self.limited):
            if h.get("X-RateLimit-Remaining", "").isdigit():
                return int(h["X-RateLimit-Remaining"])
        return None

    def deadline(self) -> float:
        return time.monotonic() + self.opts.timeout

    def webhook(self, path: str) -> str | None:
        return None if self.opts.webhook_url is None else self.opts.webhook_url.rstrip("/") + path


def check_healthz(s: Session) -> str:
    try:
        r = s.client.get(s.url("/healthz"))
    except httpx.HTTPError as exc:
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            s.unreachable = transport_reason(exc, s.opts.timeout)
        raise Failed(transport_reason(exc, s.opts.timeout)) from None
    need(r.status_code == 200, status_reason(r, (200,)))
    need(json_of(r) == {"status": "ok"}, f"/healthz answered {_snippet(r.text)}, expected {{\"status\": \"ok\"}}")
    return "200 ok: the ingress answers (liveness)"


def check_readyz(s: Session) -> str:
    r = s.call("GET", s.url("/readyz"), expect=(200, 503))
    body = json_of(r)
    need(r.status_code == 200, f"503 not ready ({body.get('reason') if isinstance(body, dict) else body}): no "
                               "engine replica runs or the job store does not answer (docs/faults.md)")
    need(body == {"status": "ready"}, f"/readyz answered {_snippet(r.text)}, expected {{\"status\": \"ready\"}}")
    return "200 ready: an engine replica runs and the job store answers"


def check_models(s: Session) -> str:
    body = json_of(s.call("GET", s.url("/v1/models"), headers=s.bearer()))
    data = field_of(body, "data", list, "/v1/models")
    need(len(data) == 1, f"/v1/models lists {len(data)} models, expected the one served")
    s.model = field_of(data[0], "id", str, "/v1/models data[0]")
    return f"serves {s.model}"


def check_wrong_key(s: Session) -> str:
    bad = "accept-wrong-key-" + secrets.token_hex(8)  # no real key: it names no one
    refused = []
    for api, method, path, headers, shape in (
        ("fal", "POST", APP, s.fal(bad), "detail"),
        ("eachlabs", "POST", "/v1/prediction/", s.each(bad), "error"),
        ("openai", "GET", "/v1/models", s.bearer(bad), "error"),
    ):
        try:
            r = s.client.request(method, s.url(path), headers=headers, json={})
        except httpx.HTTPError as exc:
            raise Failed(f"{api}: {transport_reason(exc, s.opts.timeout)}") from None
        need(r.status_code >= 300, f"{api}: a wrong key was accepted ({r.status_code} on {method} {path})")
        need(r.status_code == 401, f"{api}: a wrong key got {status_reason(r, (401,))}")
        need(shape in (json_of(r) or {}), f"{api}: the 401 is not in the API's shape (no '{shape}'): "
                                          f"{_snippet(r.text)}")
        refused.append(api)
    return f"401 from {', '.join(refused)}"


def _limit_values(h: httpx.Headers) -> dict[str, int] | None:
    vals = [h.get(n, "") for n in LIMIT_HEADERS[:3]]
    return dict(zip(("limit", "remaining", "reset"), map(int, vals))) if all(v.isdigit() for v in vals) else None


def _second_key_admission(s: Session) -> dict[str, int]:
    key = s.opts.second_key
    r = s.call("POST", s.url(APP), headers=s.fal(key), json=s.fal_input(max_tokens=1))
    vals = _limit_values(r.headers)
    need(vals is not None, f"the second key's answer lacks the limit headers: {dict(r.headers)}")
    return vals


def check_second_key_admitted(s: Session) -> str:
    s.second.append(_second_key_admission(s))
    v = s.second[0]
    return f"admitted: limit {v['limit']}/min, {v['remaining']} left"


def check_fal_sync(s: Session) -> str:
    r = s.call("POST", s.url(APP), headers=s.fal(), json=s.fal_input())
    s.admitted("fal.sync", r)
    body = json_of(r)
    out = field_of(body, "output", str, "fal run")
    need(body.get("partial") is False, f"fal run: 'partial' is {body.get('partial')!r}, expected false")
    stats = field_of(body, "stats", dict, "fal run")
    n_in = field_of(stats, "num_input_tokens", int, "fal run stats")
    n_out = field_of(stats, "num_output_tokens", int, "fal run stats")
    _image_tokens(n_in, "fal run")
    need(bool(r.headers.get("x-fal-request-id")), "fal run: no x-fal-request-id header")
    return f"{n_out} tokens from {n_in} input tokens: {_snippet(out, 60)!r}"


def _image_tokens(n_in: int, where: str) -> None:
    # LLaVA-1.5 gives every image 576 prompt tokens: fewer means the image did not reach the model.
    image = capacity.LLAVA_15_13B.image_tokens
    need(n_in > image, f"{where}: {n_in} input tokens, fewer than the image's {image}: the image was not used")


def check_fal_stream(s: Session) -> str:
    deadline = s.deadline()
    events: list[dict] = []
    try:
        with s.client.stream("POST", s.url(APP + "/stream"), headers=s.fal(), json=s.fal_input()) as r:
            if r.status_code != 200:
                r.read()
                raise Failed(status_reason(r, (200,)))
            s.admitted("fal.stream", r)
            ctype = r.headers.get("content-type", "")
            need(ctype.startswith("text/event-stream"), f"fal stream: content-type {ctype!r}, not text/event-stream")
            for line in r.iter_lines():
                need(time.monotonic() < deadline, f"fal stream: still open after {s.opts.timeout:g} s")
                if not line.startswith("data:"):
                    need(not line.strip(), f"fal stream: a line that is not an event: {_snippet(line)}")
                    continue
                try:
                    events.append(json.loads(line[5:]))
                except ValueError:
                    raise Failed(f"fal stream: an event that is not JSON: {_snippet(line)}") from None
    except httpx.HTTPError as exc:
        raise Failed(transport_reason(exc, s.opts.timeout)) from None
    need(bool(events), "fal stream: no event before the stream closed")
    prev = ""
    for i, ev in enumerate(events):
        out = field_of(ev, "output", str, f"fal stream event {i + 1}")
        need("error" not in ev, f"fal stream: failed after {len(prev)} characters: {ev.get('error')}")
        need(out.startswith(prev), f"fal stream event {i + 1}: output is not cumulative")
        need(ev.get("partial") is (i < len(events) - 1),
             f"fal stream event {i + 1} of {len(events)}: 'partial' is {ev.get('partial')!r}")
        prev = out
    stats = field_of(events[-1], "stats", dict, "fal stream's last event")
    n_out = field_of(stats, "num_output_tokens", int, "fal stream's last event stats")
    return f"{len(events)} events, cumulative, the last final with {n_out} tokens"


def _fal_status(s: Session, job: dict, deadline: float) -> tuple[dict, list[str]]:
    """Poll a job's status_url until COMPLETED; the last status and the statuses seen."""
    seen: list[str] = []
    while True:
        r = s.call("GET", job["status_url"], expect=(200, 202), params={"logs": "1"}, headers=s.fal())
        st = json_of(r)
        status = field_of(st, "status", str, "fal status")
        need(status in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED"), f"fal status: unknown status {status!r}")
        need((r.status_code == 200) == (status == "COMPLETED"),
             f"fal status: HTTP {r.status_code} with status {status} (docs/api.md §2.5.2)")
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == "COMPLETED":
            return st, seen
        need(time.monotonic() < deadline, f"fal job {job['request_id']} not COMPLETED after {s.opts.timeout:g} s "
                                          f"(statuses seen: {' → '.join(seen)})")
        time.sleep(POLL_S)


def _fal_submit(s: Session, check: str, max_tokens: int, webhook: str | None = None) -> dict:
    params = {} if webhook is None else {"fal_webhook": webhook}
    r = s.call("POST", s.url("/queue" + APP), headers=s.fal(), json=s.fal_input(max_tokens), params=params)
    s.admitted(check, r)
    job = json_of(r)
    for name in ("request_id", "status_url", "response_url", "cancel_url"):
        field_of(job, name, str, "fal submit")
    field_of(job, "queue_position", int, "fal submit")
    need(job.get("status") == "IN_QUEUE", f"fal submit: status {job.get('status')!r}, expected IN_QUEUE")
    need(r.headers.get("x-fal-request-id") == job["request_id"], "fal submit: x-fal-request-id is not the request_id")
    for name in ("status_url", "response_url", "cancel_url"):
        need(urlsplit(job[name]).scheme in ("http", "https"), f"fal submit: {name} {job[name]!r} is not a URL")
    return job


def check_fal_submit(s: Session) -> str:
    s.fal_job = _fal_submit(s, "fal.queue.submit", CHECK_MAX_TOKENS, s.webhook("/fal"))
    job = s.fal_job
    where = "" if job["status_url"].startswith(s.base + "/") else (
        f"; its URLs point to {urlsplit(job['status_url']).netloc} (http.public_base_url / fal.queue_base_url)")
    return f"IN_QUEUE at position {job['queue_position']}{where}"


def check_fal_status(s: Session) -> str:
    need(s.fal_job is not None, "not run: fal.queue.submit failed")
    started = time.monotonic()
    st, seen = _fal_status(s, s.fal_job, s.deadline())
    need("error" not in st, f"fal job failed: {st.get('error')} ({st.get('error_type')})")
    return f"{' → '.join(seen)} in {time.monotonic() - started:.1f} s (polling the status_url)"


def check_fal_result(s: Session) -> str:
    need(s.fal_job is not None, "not run: fal.queue.submit failed")
    body = json_of(s.call("GET", s.fal_job["response_url"], headers=s.fal()))
    out = field_of(body, "output", str, "fal result")
    stats = field_of(body, "stats", dict, "fal result")
    _image_tokens(field_of(stats, "num_input_tokens", int, "fal result stats"), "fal result")
    return f"{stats.get('num_output_tokens')} tokens from the response_url: {_snippet(out, 60)!r}"


def check_fal_cancel(s: Session) -> str:
    job = _fal_submit(s, "fal.queue.cancel", CANCEL_MAX_TOKENS)
    r = s.call("PUT", job["cancel_url"], expect=(200, 202, 400), headers=s.fal())
    body = json_of(r)
    need(r.status_code != 400, f"the cancel came too late: {body} (a {CANCEL_MAX_TOKENS}-token job finished first)")
    when = {200: ("OK", "queued"), 202: ("CANCELLATION_REQUESTED", "running")}[r.status_code]
    need(body == {"status": when[0]}, f"fal cancel: HTTP {r.status_code} with {_snippet(r.text)}")
    st, _ = _fal_status(s, job, s.deadline())
    need(st.get("error_type") == "request_cancelled",
         f"fal cancel: the job COMPLETED with error_type {st.get('error_type')!r}, not request_cancelled")
    res = s.call("GET", job["response_url"], expect=(400,), headers=s.fal())
    need(json_of(res).get("error_type") == "request_cancelled", f"fal cancel: the result is {_snippet(res.text)}")
    return f"cancelled while {when[1]} ({r.status_code} {when[0]}); the result is 400 request_cancelled"


def check_fal_webhook(s: Session) -> str:
    need(s.fal_job is not None, "not run: fal.queue.submit failed")
    rid = s.fal_job["request_id"]
    body = s.receiver.wait(lambda b: isinstance(b, dict) and b.get("request_id") == rid, s.deadline())
    need(body is not None, f"no webhook for {rid} at {s.opts.webhook_url}/fal within {s.opts.timeout:g} s: the "
                           "deployment must reach that URL, and media.allow_networks / allow_hosts must admit its "
                           "address (docs/api.md §2.10)")
    need(body.get("status") == "OK", f"fal webhook: status {body.get('status')!r}, error {body.get('error')!r}")
    field_of(body.get("payload"), "output", str, "fal webhook payload")
    return "POSTed with status OK and the result as its payload"


def check_each_create(s: Session) -> str:
    r = s.call("POST", s.url("/v1/prediction/"), headers=s.each(), json=s.each_body(webhook=s.webhook("/eachlabs")))
    s.admitted("eachlabs.create", r)
    body = json_of(r)
    need(body.get("status") == "success", f"eachlabs create: status {body.get('status')!r}, expected success")
    s.prediction = field_of(body, "predictionID", str, "eachlabs create")
    return "accepted (status success, a predictionID)"


def _each_poll(s: Session, pid: str, deadline: float) -> tuple[dict, list[str]]:
    seen: list[str] = []
    while True:
        p = json_of(s.call("GET", s.url(f"/v1/prediction/{pid}"), headers=s.each()))
        status = field_of(p, "status", str, "eachlabs get")
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in ("success", "error", "cancelled"):
            return p, seen
        need(status in ("created", "starting", "processing"), f"eachlabs get: unknown status {status!r}")
        need(time.monotonic() < deadline, f"prediction {pid} still {status} after {s.opts.timeout:g} s")
        time.sleep(POLL_S)


def check_each_poll(s: Session) -> str:
    need(s.prediction is not None, "not run: eachlabs.create failed")
    started = time.monotonic()
    p, seen = _each_poll(s, s.prediction, s.deadline())
    need(p["status"] == "success", f"the prediction ended {p['status']}: {_snippet(json.dumps(p.get('output')))}")
    out = field_of(p, "output", list, "eachlabs get")
    need(all(isinstance(c, str) for c in out), "eachlabs get: output is not a list of text chunks")
    field_of(p, "urls", dict, "eachlabs get")
    return (f"{' → '.join(seen)} in {time.monotonic() - started:.1f} s, {len(out)} chunks: "
            f"{_snippet(''.join(out), 50)!r}")


def check_each_cancel(s: Session) -> str:
    r = s.call("POST", s.url("/v1/prediction/"), headers=s.each(), json=s.each_body(CANCEL_MAX_TOKENS))
    s.admitted("eachlabs.cancel", r)
    pid = field_of(json_of(r), "predictionID", str, "eachlabs create")
    c = s.call("POST", s.url(f"/v1/prediction/{pid}/cancel"), expect=(200, 400), headers=s.each())
    need(c.status_code == 200, f"the cancel came too late: {_snippet(c.text)} (a {CANCEL_MAX_TOKENS}-token "
                               "prediction finished first)")
    need(json_of(c).get("status") == "success", f"eachlabs cancel: {_snippet(c.text)}")
    p, _ = _each_poll(s, pid, s.deadline())
    need(p["status"] == "cancelled", f"eachlabs cancel: the prediction ended {p['status']}, not cancelled")
    return "cancelled (200, then status cancelled)"


def check_each_webhook(s: Session) -> str:
    need(s.prediction is not None, "not run: eachlabs.create failed")
    pid = s.prediction
    body = s.receiver.wait(lambda b: isinstance(b, dict) and b.get("exec_id") == pid, s.deadline())
    need(body is not None, f"no webhook for {pid} at {s.opts.webhook_url}/eachlabs within {s.opts.timeout:g} s: the "
                           "deployment must reach that URL, and media.allow_networks / allow_hosts must admit its "
                           "address (docs/api.md §3.8)")
    need(body.get("status") == "succeeded", f"eachlabs webhook: status {body.get('status')!r}")
    need(isinstance(body.get("output"), list), "eachlabs webhook: output is not a list")
    return "POSTed with status succeeded and the output"


def check_openai_chat(s: Session) -> str:
    need(s.model is not None, "not run: openai.models failed (the served model's name)")
    r = s.call("POST", s.url("/v1/chat/completions"), headers=s.bearer(), json=s.chat_body(CHECK_MAX_TOKENS))
    s.admitted("openai.chat", r)
    body = json_of(r)
    need(body.get("object") == "chat.completion", f"chat completion: object {body.get('object')!r}")
    choices = field_of(body, "choices", list, "chat completion")
    need(len(choices) == 1, f"chat completion: {len(choices)} choices")
    msg = field_of(choices[0], "message", dict, "chat completion choices[0]")
    text = field_of(msg, "content", str, "chat completion message")
    usage = field_of(body, "usage", dict, "chat completion")
    _image_tokens(field_of(usage, "prompt_tokens", int, "chat completion usage"), "chat completion")
    need(bool(r.headers.get("x-request-id")), "chat completion: no x-request-id header")
    return (f"{usage.get('completion_tokens')} tokens from {usage['prompt_tokens']} prompt tokens: "
            f"{_snippet(text, 50)!r}")


def check_limit_headers(s: Session) -> str:
    need(bool(s.limited), "not run: no generation was admitted")
    for check, h in s.limited:
        missing = [n for n in LIMIT_HEADERS if n not in h]
        need(not missing, f"{check}'s answer lacks {', '.join(missing)} (docs/api.md §4.2)")
        v = _limit_values(h)
        need(v is not None, f"{check}: X-RateLimit-* are not integers: " +
             ", ".join(f"{n}: {h[n]}" for n in LIMIT_HEADERS[:3]))
        need(v["remaining"] <= v["limit"], f"{check}: {v['remaining']} remaining of a limit of {v['limit']}")
        need(h["RateLimit-Policy"] == f'"default";q={v["limit"]};w=60',
             f"{check}: RateLimit-Policy {h['RateLimit-Policy']!r} disagrees with X-RateLimit-Limit {v['limit']}")
        need(h["RateLimit"] == f'"default";r={v["remaining"]};t={v["reset"]}',
             f"{check}: RateLimit {h['RateLimit']!r} disagrees with X-RateLimit-Remaining/-Reset")
    last = _limit_values(s.limited[-1][1])
    return (f"on all {len(s.limited)} admitted answers; limit {last['limit']}/min, {last['remaining']} left, "
            f"oldest admission leaves the window in {last['reset']} s")


def check_keys_isolated(s: Session) -> str:
    need(len(s.second) == 1, "not run: the second key's first request failed (limits.second-key row above)")
    before, after = s.second[0], _second_key_admission(s)
    first = len(s.limited)
    # Shared windows would have taken the first key's admissions out of the second key's budget too; a window
    # that slid meanwhile only gives back, so fewer lost than the first key spent means separate windows.
    lost = before["remaining"] - after["remaining"]
    need(lost < 1 + first, f"the second key lost {lost} admissions while it made 1 and the first key {first}: "
                           "the keys share one window")
    return (f"{before['remaining']} → {after['remaining']} left of {after['limit']}/min across the first key's "
            f"{first} admissions: separate budgets")


def check_api_metrics(s: Session) -> str:
    r = s.call("GET", s.url("/metrics"), expect=(200, 404))
    if r.status_code == 404:
        return "off (404), as production has it: Prometheus scrapes the Ray pods' metrics port"
    need("# TYPE" in r.text, f"/metrics answered 200 but not Prometheus text: {_snippet(r.text)}")
    return "answers 200 on the API port (telemetry.metrics_route): its series name every key"


def check_metrics_scrape(s: Session) -> str:
    r = s.call("GET", s.opts.metrics_url)
    need("# TYPE" in r.text, f"{s.opts.metrics_url} answered 200 but not Prometheus text: {_snippet(r.text)}")
    names = {line.split()[2] for line in r.text.splitlines() if line.startswith("# TYPE ") and len(line.split()) > 3}
    ours = sorted(n for n in names if n.startswith("ray_llava_"))
    vllm = sum(n.startswith("ray_vllm_") for n in names)
    return f"{len(names)} metrics: {len(ours)} ray_llava_*, {vllm} ray_vllm_*"


# --- the load ------------------------------------------------------------------------------------------------


def _load_one(s: Session) -> Sample:
    started = time.monotonic()
    smp = Sample(started, started)
    try:
        with s.client.stream("POST", s.url("/v1/chat/completions"), headers=s.bearer(),
                             json=s.chat_body(s.opts.max_tokens, stream=True)) as r:
            if r.status_code != 200:
                r.read()
                raise Failed(status_reason(r, (200,)))
            done = False
            for line in r.iter_lines():
                need(time.monotonic() - started < s.opts.timeout, f"stream still open after {s.opts.timeout:g} s")
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise Failed(f"a chunk that is not JSON: {_snippet(data)}") from None
                need(isinstance(chunk, dict), f"a chunk that is not an object: {_snippet(data)}")
                need("error" not in chunk, f"the stream failed: {_snippet(json.dumps(chunk.get('error')))}")
                for choice in chunk.get("choices") or []:
                    if smp.ttft is None and (choice.get("delta") or {}).get("content"):
                        smp.ttft = time.monotonic() - started
                if isinstance(chunk.get("usage"), dict):
                    smp.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
                    smp.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
            need(done, "the stream closed before [DONE]")
            need(smp.output_tokens > 0, "no usage chunk with completion_tokens (stream_options.include_usage)")
    except Failed as exc:
        smp.error = str(exc)
    except httpx.HTTPError as exc:
        smp.error = transport_reason(exc, s.opts.timeout)
    except Exception as exc:  # a chunk of a shape no check foresaw: a failed request, not a lost thread
        smp.error = f"unexpected {type(exc).__name__}: {_snippet(str(exc))}"
    smp.ended = time.monotonic()
    return smp


def check_load(s: Session) -> str:
    need(s.model is not None, "not run: openai.models failed (the served model's name)")
    cap, s.load_cap = s.opts.load_requests, "--load-requests"
    left = s.remaining()
    if left is not None and left < cap:
        cap, s.load_cap = left, "the key's remaining budget"
    need(cap > 0, "the key has no admissions left in its window: wait a minute, or use a key with room")
    lock, claimed = threading.Lock(), [0]
    stop_at = time.monotonic() + s.opts.load_seconds

    def worker() -> None:
        while time.monotonic() < stop_at:
            with lock:
                if claimed[0] >= cap:
                    return
                claimed[0] += 1
            smp = _load_one(s)
            with lock:
                s.samples.append(smp)

    with ThreadPoolExecutor(s.opts.concurrency) as pool:
        for _ in range(s.opts.concurrency):
            pool.submit(worker)
    s.figures = load_figures(s.samples, s.opts.concurrency)
    bad = [x for x in s.samples if x.error]
    need(bool(s.samples), "no request was sent")
    need(not bad, f"{len(bad)} of {len(s.samples)} requests failed; the first: {bad[0].error if bad else ''}")
    bounded = "ran its time" if len(s.samples) < cap else f"stopped at {cap} requests ({s.load_cap})"
    return f"{len(s.samples)} streamed chat completions at {s.opts.concurrency} concurrent, {bounded}"


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation between a handful of samples)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def load_figures(samples: list[Sample], concurrency: int) -> dict[str, Any]:
    ok = [x for x in samples if not x.error]
    if not ok:
        return {"requests": 0, "failed": len(samples), "concurrency": concurrency}
    wall = max(x.ended for x in ok) - min(x.started for x in ok)
    ttfts = [x.ttft for x in ok if x.ttft is not None]
    return {
        "requests": len(ok), "failed": len(samples) - len(ok), "concurrency": concurrency, "seconds": wall,
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95),
        "output_tokens_s": sum(x.output_tokens for x in ok) / wall, "requests_s": len(ok) / wall,
        "mean_prompt_tokens": sum(x.prompt_tokens for x in ok) / len(ok),
        "mean_output_tokens": sum(x.output_tokens for x in ok) / len(ok),
    }


def modelled(cfg, concurrency: int, prompt_tokens: float, output_tokens: float) -> dict[str, float]:
    """What docs/capacity.md's model gives one L40S replica running `concurrency` sequences of these lengths:
    the batch is the concurrency (when the config and the KV cache allow it), not the full-load batch."""
    image = capacity.LLAVA_15_13B.image_tokens
    engine = cfg.engine.model_copy(update={"max_num_seqs": min(cfg.engine.max_num_seqs, concurrency)})
    workload = capacity.Workload(rps=1.0, prompt_tokens=max(0, round(prompt_tokens) - image),
                                 output_tokens=max(1, round(output_tokens)))
    est = capacity.estimate(cfg.model_copy(update={"engine": engine}), workload)
    return {"ttft_s": est.prefill_s, "output_tokens_s": est.replica_output_tokens_s, "requests_s": est.replica_rps,
            "batch": est.batch}


def compare(figures: dict[str, Any], model: dict[str, float], min_ratio: float | None) -> tuple[dict, list[str]]:
    """Measured over modelled, each the way round where above 1 is better than the model; the throughput ratios
    under `min_ratio`. TTFT is reported only: the model's is the prefill alone, without the network, the image's
    decoding and the ingress, so it is a floor no deployment reaches."""
    ttft = figures.get("ttft_p50_s")
    ratios = {"ttft": model["ttft_s"] / ttft if ttft else 0.0,
              "output_tokens_s": figures["output_tokens_s"] / model["output_tokens_s"],
              "requests_s": figures["requests_s"] / model["requests_s"]}
    low = [] if min_ratio is None else [f"{label} {ratios[k]:.2f} < {min_ratio:g}" for k, label in
                                        (("output_tokens_s", "output tokens/s"), ("requests_s", "requests/s"))
                                        if ratios[k] < min_ratio]
    return ratios, low


def check_vs_capacity(s: Session) -> str:
    figures = s.figures
    need(figures is not None and figures["requests"] > 0, "not run: the load produced no figures")
    try:
        cfg = load_config(s.opts.config)
    except (OSError, ConfigError) as exc:
        if s.opts.min_ratio is None:
            raise Skipped(f"no capacity model: {_snippet(str(exc))} (--config names the deployment's config)")
        raise Failed(f"--min-ratio needs the capacity model: {_snippet(str(exc))}") from None
    model = modelled(cfg, s.opts.concurrency, figures["mean_prompt_tokens"], figures["mean_output_tokens"])
    ratios, low = compare(figures, model, s.opts.min_ratio)
    figures |= {"model": model, "ratios": ratios, "min_ratio": s.opts.min_ratio, "config": str(s.opts.config)}
    summary = (f"measured / model: output tokens/s {ratios['output_tokens_s']:.2f}, requests/s "
               f"{ratios['requests_s']:.2f}, TTFT {ratios['ttft']:.2f}")
    need(not low, f"below --min-ratio: {', '.join(low)} (TTFT {ratios['ttft']:.2f})")
    return summary + ("" if s.opts.min_ratio is None else f"; all throughput at least {s.opts.min_ratio:g}")


# --- the order ----------------------------------------------------------------------------------------------

# (name, check): each row of the report, in the order run. The second key is admitted once before the first key's
# checks and once after, so its window's change shows whether the first key's admissions reached it.
CHECKS: list[tuple[str, Callable[[Session], str]]] = [
    ("healthz", check_healthz),
    ("readyz", check_readyz),
    ("openai.models", check_models),
    ("auth.wrong-key", check_wrong_key),
    ("limits.second-key", check_second_key_admitted),
    ("fal.sync", check_fal_sync),
    ("fal.stream", check_fal_stream),
    ("fal.queue.submit", check_fal_submit),
    ("fal.queue.status", check_fal_status),
    ("fal.queue.result", check_fal_result),
    ("fal.queue.cancel", check_fal_cancel),
    ("fal.webhook", check_fal_webhook),
    ("eachlabs.create", check_each_create),
    ("eachlabs.poll", check_each_poll),
    ("eachlabs.cancel", check_each_cancel),
    ("eachlabs.webhook", check_each_webhook),
    ("openai.chat", check_openai_chat),
    ("limits.headers", check_limit_headers),
    ("limits.isolated", check_keys_isolated),
    ("metrics.api-port", check_api_metrics),
    ("metrics.scrape", check_metrics_scrape),
    ("load", check_load),
    ("load.vs-capacity", check_vs_capacity),
]


# The checks that run only when asked for, and the option that asks.
OPTIONAL: dict[str, tuple[str, Callable[[Options], object]]] = {
    "limits.second-key": ("--second-key", lambda o: o.second_key),
    "limits.isolated": ("--second-key", lambda o: o.second_key),
    "fal.webhook": ("--webhook-listen", lambda o: o.webhook_listen),
    "eachlabs.webhook": ("--webhook-listen", lambda o: o.webhook_listen),
    "metrics.scrape": ("--metrics-url", lambda o: o.metrics_url),
}


def _one(name: str, fn: Callable[[], str], s: Session) -> Check:
    started = time.monotonic()
    try:
        if name in OPTIONAL and not OPTIONAL[name][1](s.opts):
            raise Skipped(f"no {OPTIONAL[name][0]}")
        if s.unreachable is not None:
            raise Failed(f"not run: {s.base} is unreachable (healthz)")
        status, detail = PASS, fn()
    except Skipped as exc:
        status, detail = SKIP, f"skipped: {exc}"
    except Failed as exc:
        status, detail = FAIL, str(exc)
    except httpx.HTTPError as exc:
        status, detail = FAIL, transport_reason(exc, s.opts.timeout)
    except Exception as exc:  # a shape no check foresaw: still a row, never a traceback
        status, detail = FAIL, f"unexpected {type(exc).__name__}: {_snippet(str(exc))}"
    return Check(name, status, detail, time.monotonic() - started)


def run(opts: Options, on_check: Callable[[Check], None] = lambda c: None) -> Report:
    """Every check against opts.url, in order; `on_check` sees each row as it is done. ValueError: the webhook
    receiver cannot listen."""
    report = Report(opts.url)
    timeout = httpx.Timeout(opts.timeout, connect=min(opts.timeout, 10.0))
    try:
        receiver = Receiver(opts.webhook_listen) if opts.webhook_listen else None
    except OSError as exc:  # the address is taken, or not this machine's
        raise ValueError(f"cannot listen on {opts.webhook_listen[0]}:{opts.webhook_listen[1]}: {exc}") from None
    try:
        with httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=opts.concurrency + 4)) as client:
            s = Session(opts, client, receiver)
            for name, fn in CHECKS:
                check = _one(name, lambda: fn(s), s)
                report.checks.append(check)
                on_check(check)
    finally:
        if receiver is not None:
            receiver.close()
    report.load = s.figures or load_figures(s.samples, opts.concurrency)
    report.budget = {"check_admissions": len(s.limited), "load_requests": len(s.samples),
                     "load_bounded_by": s.load_cap or None, "remaining_before_load": s.remaining()}
    return report


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def default_webhook_url(listen: tuple[str, int]) -> str:
    host, port = listen
    if host in ("0.0.0.0", "::", ""):
        raise ValueError("--webhook-listen on every address needs --webhook-url: the address the deployment reaches")
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}"

