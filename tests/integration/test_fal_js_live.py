"""fal on the live stack with the real JS client, `@fal-ai/client@1.10.1` (docs/api.md §5.2), in both ways a
user can point it at this server: URL-rewriting middleware and `proxyUrl` (x-fal-target-url, §2.8)."""

from __future__ import annotations

import itertools

import pytest

from tests.conftest import LOCAL_KEY, data_uri
from tests.integration.conftest import run_js, wait_for_abort

MODES = ["middleware", "proxy"]
SCENARIOS = ["run", "subscribe_polling", "subscribe_streaming", "stream", "queue", "cancel", "validation"]
MAX_NEW_TOKENS = 8  # what fal.mjs asks for; the test model emits one character per token, never stopping early
STATUSES = ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
LOG_LEVELS = {"STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG"}
LOG_STEPS = ["Image fetched", "Generating", "Generated"]  # the job's log messages start so, in this order


def fal_js(stack: str, mode: str, scenario: str) -> dict:
    return run_js("fal.mjs", mode, scenario, env={"LLAVA_BASE_URL": stack, "FAL_KEY": LOCAL_KEY, "IMAGE": data_uri()})


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def assert_output(data: dict, n: int = MAX_NEW_TOKENS) -> None:
    """The fal Output object of a finished generation (§2.2)."""
    assert set(data) == {"output", "partial", "stats"}, data
    assert isinstance(data["output"], str) and len(data["output"]) == n, data
    assert data["partial"] is False, data
    stats = data["stats"]
    assert set(stats) == {"num_input_tokens", "num_output_tokens"}, stats
    assert is_int(stats["num_input_tokens"]) and stats["num_input_tokens"] > 576, stats  # the image's 576 tokens + the prompt
    assert stats["num_output_tokens"] == n and is_int(stats["num_output_tokens"]), stats


def assert_status(status: dict, request_id: str, logs_requested: bool) -> None:
    """A queue status object as the JS `QueueStatus` type has it (§2.5.2)."""
    assert status["status"] in STATUSES, status
    assert status["request_id"] == request_id, status
    if status["status"] == "IN_QUEUE":
        assert is_int(status["queue_position"]) and status["queue_position"] >= 0, status
    else:
        assert "logs" in status, status
        assert isinstance(status["logs"], list) if logs_requested else status["logs"] is None, status


def assert_job_logs(logs: list) -> None:
    """All logs of a finished job: well-formed entries, the job's steps in order."""
    for entry in logs:
        assert isinstance(entry["message"], str) and entry["level"] in LOG_LEVELS, entry
        assert entry["source"] == "USER" and isinstance(entry["timestamp"], str) and entry["timestamp"], entry
    messages = [entry["message"] for entry in logs]
    first = []
    for step in LOG_STEPS:
        hits = [i for i, message in enumerate(messages) if message.startswith(step)]
        assert hits, f"no log message starting with {step!r} in {messages}"
        first.append(hits[0])
    assert first == sorted(first), messages


def assert_updates(updates: list, request_id: str) -> list[str]:
    """onQueueUpdate calls: valid statuses, never going back, ending with the one COMPLETED."""
    statuses = [u["status"] for u in updates]
    assert statuses and statuses[-1] == "COMPLETED" and statuses.count("COMPLETED") == 1, statuses
    ranks = [STATUSES.index(s) for s in statuses]
    assert ranks == sorted(ranks), statuses
    for update in updates:
        assert_status(update, request_id, logs_requested=True)
    return statuses


def assert_api_error(error: dict, status: int, request_id: str | None = None) -> None:
    assert error["isApiError"], error
    assert error["isValidationError"] is (status == 422), error
    assert error["status"] == status, error
    if request_id is None:
        assert error["requestId"], error  # x-fal-request-id on every fal response, errors included (§2.6)
    else:
        assert error["requestId"] == request_id, error


def check_run(out: dict) -> None:
    assert out["requestId"]  # from the x-fal-request-id header (§2.3)
    assert_output(out["data"])


def check_subscribe(out: dict) -> None:
    request_id = out["enqueued"]
    assert request_id and out["requestId"] == request_id  # onEnqueue's id is the one the result carries
    assert_updates(out["updates"], request_id)
    assert_job_logs(out["updates"][-1]["logs"])  # the COMPLETED update holds all the logs (the client's own, in streaming)
    assert_output(out["data"])


def check_stream(out: dict) -> None:
    events, done = out["events"], out["done"]
    assert out["requestId"]
    assert len(events) >= 2, events
    for event, following in itertools.pairwise(events):
        assert event["partial"] is True and isinstance(event["output"], str), events
        assert following["output"].startswith(event["output"]), events  # cumulative text (§2.4)
    assert_output(events[-1])
    assert done == events[-1]  # stream.done() resolves with the final event


def check_queue(out: dict) -> None:
    request_id = out["submitted"]["request_id"]
    assert request_id and out["submitted"]["status"] in STATUSES, out["submitted"]
    assert_status(out["status"], request_id, logs_requested=True)
    completed = out["completed"]
    assert completed["status"] == "COMPLETED"
    assert_status(completed, request_id, logs_requested=True)
    assert_job_logs(completed["logs"])
    assert out["statusWithoutLogs"]["status"] == "COMPLETED"
    assert_status(out["statusWithoutLogs"], request_id, logs_requested=False)  # logs null when not asked for
    assert out["result"]["requestId"] == request_id
    assert_output(out["result"]["data"])


def check_cancel(out: dict) -> None:
    request_id = out["submitted"]["request_id"]
    assert request_id
    assert out["running"]["status"] == "IN_PROGRESS", f"the job ended before it could be cancelled: {out['running']}"
    assert out["cancel"] == {"ok": True, "value": None}, out["cancel"]  # queue.cancel() resolves to undefined
    final = out["final"]
    assert_status(final, request_id, logs_requested=True)
    assert final["status"] == "COMPLETED" and final.get("error_type") == "request_cancelled", final
    assert not out["result"]["ok"], out["result"]
    assert_api_error(out["result"]["error"], 400, request_id)
    assert out["result"]["error"]["body"].get("error_type") == "request_cancelled", out["result"]
    assert not out["cancelAgain"]["ok"], out["cancelAgain"]
    assert_api_error(out["cancelAgain"]["error"], 400, request_id)
    assert out["cancelAgain"]["error"]["body"] == {"status": "ALREADY_COMPLETED"}, out["cancelAgain"]


def check_validation(out: dict) -> None:
    # Synchronous run without a prompt: 422 with pydantic's field error.
    assert not out["noPrompt"]["ok"], out["noPrompt"]
    error = out["noPrompt"]["error"]
    assert error["name"] == "ValidationError" and error["message"] == "Unprocessable Entity", error
    assert_api_error(error, 422)
    assert error["fieldErrors"][0]["loc"] == ["body", "prompt"] and error["fieldErrors"][0]["type"] == "missing", error
    # A queued job whose image cannot be fetched: COMPLETED with the error, the result replays the 422.
    request_id = out["enqueued"]
    assert request_id
    assert_updates(out["updates"], request_id)
    assert out["updates"][-1].get("error_type") == "file_download_error", out["updates"][-1]
    assert not out["badImage"]["ok"], out["badImage"]
    error = out["badImage"]["error"]
    assert error["name"] == "ValidationError", error
    assert_api_error(error, 422, request_id)
    field = error["fieldErrors"][0]
    assert field["type"] == "file_download_error" and field["loc"] == ["body", "image_url"], error


CHECKS = {
    "run": check_run,
    "subscribe_polling": check_subscribe,
    "subscribe_streaming": check_subscribe,
    "stream": check_stream,
    "queue": check_queue,
    "cancel": check_cancel,
    "validation": check_validation,
}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("mode", MODES)
def test_js_fal_client(stack, engine_stats, mode, scenario):
    before = engine_stats() if scenario == "cancel" else None
    out = fal_js(stack, mode, scenario)
    assert out["mode"] == mode and out["scenario"] == scenario
    CHECKS[scenario](out)
    if scenario == "cancel":  # the cancelled job's engine request was aborted too
        assert wait_for_abort(engine_stats, before)["aborted"] == before["aborted"] + 1
