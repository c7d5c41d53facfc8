"""`llava-serve accept` against deployments that are broken: each fault is a failed row that names it, the exit
status is 1, `--json` says what the table says, the load's figures are measured and compared honestly, and keys
that share one rate window are caught."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time

import httpx
import pytest

from serve import accept
from serve.cli import main
from tests.conftest import free_port
from tests.readme_blocks import README

KEY = "accept-unit-key"
TTFT_S = 0.2  # the broken deployment's streamed chat waits this long before its first token


class Broken(http.server.BaseHTTPRequestHandler):
    """A deployment with a fault on most routes, and a working streamed chat (what the load sends)."""

    protocol_version = "HTTP/1.1"

    def answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")

    def do_GET(self):  # noqa: N802
        if self.path == "/healthz":
            self.answer(200, {"status": "ok"})
        elif self.path == "/readyz":
            self.answer(503, {"status": "not ready", "reason": "EngineDeadError"})
        elif self.path == "/v1/models":
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                self.answer(401, {"error": {"code": "invalid_api_key"}})
            else:
                self.answer(200, {"object": "list", "data": [{"id": "tiny-llava"}]})
        else:
            self.answer(404, {"detail": "Not Found"})  # no /metrics: as production has it

    def do_POST(self):  # noqa: N802
        body = self.body()
        if self.path == "/fal-ai/llavav15-13b":
            # Fault: any key is taken, and then the generation fails.
            if self.headers.get("Authorization") != f"Key {KEY}":
                self.answer(200, {"output": "", "partial": False})
            else:
                self.answer(500, {"detail": "Internal Server Error", "error_type": "internal_server_error"})
        elif self.path == "/fal-ai/llavav15-13b/stream":
            self.answer(200, {"output": "not a stream"})  # fault: JSON, not server-sent events
        elif self.path.startswith("/queue/fal-ai/llavav15-13b"):
            self.answer(200, {"status": "IN_QUEUE", "request_id": "r-1"})  # fault: no URLs to follow
        elif self.path == "/v1/chat/completions" and body.get("stream"):
            self.stream_chat()
        elif self.path == "/v1/chat/completions":
            time.sleep(3)  # fault: slower than the run's --timeout
            self.answer(200, {})
        else:
            self.answer(404, {"detail": "Not Found"})  # fault: no Eachlabs routes at all

    def stream_chat(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        chunks = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]}, None,
                  {"choices": [{"delta": {"content": "a red"}}]}, {"choices": [{"delta": {}, "finish_reason": "stop"}]},
                  {"choices": [], "usage": {"prompt_tokens": 640, "completion_tokens": 8}}]
        for chunk in chunks:
            if chunk is None:
                time.sleep(TTFT_S)
                continue
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer: as it should
            pass


@pytest.fixture(scope="module")
def broken():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def accept_cli(capsys, url: str, *extra: str) -> tuple[int, str, str]:
    code = main(["accept", "--url", url, "--key", KEY, "--timeout", "1", "--load-seconds", "1",
                 "--concurrency", "2", "--load-requests", "6", *extra])
    out, err = capsys.readouterr()
    return code, out, err


ROW = re.compile(r"  (PASS|FAIL|SKIP)\s+(\S+)\s+[\d.]+s  (.*)")


def rows(table: str) -> dict[str, tuple[str, str]]:
    """The table's rows: check name -> (result, detail)."""
    return {m[2]: (m[1], m[3]) for m in map(ROW.fullmatch, table.splitlines()) if m}


def test_a_broken_deployment_fails_with_each_fault_named(capsys, broken):
    code, out, err = accept_cli(capsys, broken)
    assert code == 1 and "Traceback" not in out + err
    got = rows(out)
    assert [name for name, _ in accept.CHECKS] == list(got)
    expected_failures = {
        "readyz": "503 not ready (EngineDeadError)",
        "auth.wrong-key": "fal: a wrong key was accepted (200 on POST /fal-ai/llavav15-13b)",
        "fal.sync": "HTTP 500 from POST /fal-ai/llavav15-13b (expected 200)",
        "fal.stream": "content-type 'application/json', not text/event-stream",
        "fal.queue.submit": "fal submit: no 'status_url'",
        "fal.queue.status": "not run: fal.queue.submit failed",
        "fal.queue.cancel": "fal submit: no 'status_url'",
        "eachlabs.create": "HTTP 404 from POST /v1/prediction/ (expected 200)",
        "eachlabs.poll": "not run: eachlabs.create failed",
        "openai.chat": "/v1/chat/completions within 1 s",
        "limits.headers": "fal.stream's answer lacks X-RateLimit-Limit, X-RateLimit-Remaining",
    }
    for name, reason in expected_failures.items():
        assert got[name][0] == "FAIL" and reason in got[name][1], (name, got[name])
    for name in ("healthz", "openai.models", "load", "load.vs-capacity"):
        assert got[name][0] == "PASS", (name, got[name])
    assert got["metrics.api-port"] == ("PASS", "off (404), as production has it: Prometheus scrapes the Ray pods' "
                                               "metrics port")
    for name, flag in (("limits.second-key", "--second-key"), ("fal.webhook", "--webhook-listen"),
                       ("metrics.scrape", "--metrics-url")):
        assert got[name] == ("SKIP", f"skipped: no {flag}"), name
    failed = [name for name, (result, _) in got.items() if result == "FAIL"]
    assert f"FAILED: {len(failed)} of {len(got)} checks failed: {', '.join(failed)}" in out


def test_json_is_one_object_with_what_the_table_says(capsys, broken):
    _, table, _ = accept_cli(capsys, broken)
    code, out, _ = accept_cli(capsys, broken, "--json")
    assert code == 1
    report = json.loads(out)  # the whole output is the one object
    assert report["ok"] is False and report["url"] == broken
    shown = rows(table)
    assert [c["name"] for c in report["checks"]] == list(shown)
    for c in report["checks"]:
        assert set(c) == {"name", "status", "ok", "detail", "seconds"}
        assert c["ok"] == {"pass": True, "fail": False, "skip": None}[c["status"]]
        assert shown[c["name"]][0] == c["status"].upper()
        if c["name"] not in ("load", "load.vs-capacity"):  # these two carry figures of their own run
            assert shown[c["name"]][1] == c["detail"]


def test_the_load_measures_ttft_and_throughput_and_compares_them(capsys, broken):
    code, out, _ = accept_cli(capsys, broken, "--json")
    load = json.loads(out)["load"]
    assert load["failed"] == 0 and 2 <= load["requests"] <= 6  # two at a time for a second, six at most
    assert TTFT_S <= load["ttft_p50_s"] <= load["ttft_p95_s"] < TTFT_S + 0.5
    assert load["mean_output_tokens"] == 8 and load["mean_prompt_tokens"] == 640
    assert load["output_tokens_s"] == pytest.approx(8 * load["requests_s"])
    model = load["model"]  # the production config's replica at two concurrent (docs/capacity.md)
    assert model["batch"] == 2 and model["ttft_s"] == pytest.approx(0.094, abs=0.002)
    assert load["ratios"]["requests_s"] == pytest.approx(load["requests_s"] / model["requests_s"])
    assert load["ratios"]["ttft"] == pytest.approx(model["ttft_s"] / load["ttft_p50_s"])


def test_min_ratio_fails_a_deployment_slower_than_it_and_passes_one_faster(capsys, broken):
    # 8 tokens a request in 0.2 s, two at a time: about twice what the model gives an L40S for answers this short.
    _, out, _ = accept_cli(capsys, broken, "--min-ratio", "5")
    status, detail = rows(out)["load.vs-capacity"]
    assert status == "FAIL" and "below --min-ratio: output tokens/s" in detail and " < 5, requests/s " in detail
    _, out, _ = accept_cli(capsys, broken, "--min-ratio", "0.5")
    status, detail = rows(out)["load.vs-capacity"]
    assert status == "PASS" and detail.endswith("all throughput at least 0.5")


def test_a_refused_connection_fails_fast_and_names_the_address(capsys):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    code, out, err = accept_cli(capsys, f"http://127.0.0.1:{port}")
    assert code == 1 and time.monotonic() - started < 10 and "Traceback" not in out + err
    got = rows(out)
    assert got["healthz"][0] == "FAIL" and f"cannot connect to 127.0.0.1:{port}/healthz" in got["healthz"][1]
    assert "Connection refused" in got["healthz"][1]
    for name, (result, detail) in got.items():
        if name in accept.OPTIONAL:
            assert result == "SKIP"
        elif name != "healthz":
            assert (result, detail) == ("FAIL", f"not run: http://127.0.0.1:{port} is unreachable (healthz)"), name


@pytest.mark.parametrize("shared", [False, True])
def test_the_isolation_row_tells_separate_windows_from_one_shared_window(shared):
    left: dict[str, int] = {}

    def fal_run(request: httpx.Request) -> httpx.Response:
        window = "one" if shared else request.headers["authorization"]
        left[window] = left.get(window, 60) - 1
        limit_headers = {"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": str(left[window]),
                         "X-RateLimit-Reset": "60", "RateLimit-Policy": '"default";q=60;w=60',
                         "RateLimit": f'"default";r={left[window]};t=60', "x-fal-request-id": "r-1"}
        return httpx.Response(200, headers=limit_headers, json={
            "output": "a", "partial": False, "stats": {"num_input_tokens": 600, "num_output_tokens": 1}})

    opts = accept.Options(url="http://llava.test", key="key-one", second_key="key-two")
    with httpx.Client(transport=httpx.MockTransport(fal_run)) as client:
        s = accept.Session(opts, client, None)
        accept.check_second_key_admitted(s)
        for _ in range(accept.CHECK_ADMISSIONS):  # the first key's admissions, all fal runs here
            accept.check_fal_sync(s)
        assert accept.check_limit_headers(s).startswith(f"on all {accept.CHECK_ADMISSIONS} admitted answers")
        if shared:
            with pytest.raises(accept.Failed, match="lost 8 admissions while it made 1 and the first key 7: the "
                                                    "keys share one window"):
                accept.check_keys_isolated(s)
        else:
            assert accept.check_keys_isolated(s).startswith("59 → 58 left of 60/min across the first key's 7")


@pytest.mark.parametrize("args, message", [
    (["--url", "llava.example.com", "--key", KEY], "is not an http(s) URL"),
    (["--url", "http://127.0.0.1:1", "--key", KEY, "--second-key", KEY], "--second-key is --key"),
    (["--url", "http://127.0.0.1:1", "--key", KEY, "--webhook-listen", "0.0.0.0:9000"], "needs --webhook-url"),
])
def test_options_that_cannot_work_are_refused_before_anything_runs(capsys, args, message):
    assert main(["accept", *args]) == 2
    out, err = capsys.readouterr()
    assert message in err and not out


def test_help_and_readme_state_the_budget_one_run_spends(capsys):
    with pytest.raises(SystemExit):
        main(["accept", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    spent = accept.CHECK_ADMISSIONS + accept.Options.load_requests  # the live test checks a run stays within it
    assert f"the checks spend {accept.CHECK_ADMISSIONS} of KEY's rate" in out and f"{spent} of the default 60" in out
    assert "llava-serve accept --url https://llava.example.com --key KEY" in out
    assert f"one run spends {spent} of the key's 60 requests a minute" in " ".join(README.read_text().split())
