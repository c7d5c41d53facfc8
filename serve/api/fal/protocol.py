"""fal `fal-ai/llavav15-13b` wire models (docs/api.md §2.1, §2.2) and their translation."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serve.api.chat import single_turn
from serve.api.fal.errors import job_failure, summary
from serve.api.translate import generation_request
from serve.engine.types import Completion, GenerationRequest
from serve.jobs.models import FailureKind, Job, JobError, JobStatus, LogLine

APP_ID = "fal-ai/llavav15-13b"
MAX_NEW_TOKENS = 2048


class FalInput(BaseModel):
    # fal apps are FastAPI models: unknown fields are ignored, numeric strings coerced (lax mode); "NaN" and
    # "inf" are no numbers here either (docs/api.md §1.4).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field(description="The question or instruction about the image.")
    image_url: str = Field(description="http(s) URL or data: URI of the image.")
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="Tokens to generate (default 64).")
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS, description="Alias of max_new_tokens used by older clients."
    )
    temperature: float = Field(0.2, ge=0, le=1, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, ge=0, le=1, description="Nucleus sampling mass.")

    def resolved_max_tokens(self) -> int:
        # max_new_tokens wins when both are present (docs/api.md §2.1).
        return self.max_new_tokens or self.max_tokens or 64


class FalStats(BaseModel):
    num_input_tokens: int
    num_output_tokens: int


class FalOutput(BaseModel):
    output: str
    partial: bool = False
    stats: FalStats | None = None


def to_generation_request(
    inp: FalInput, *, request_id: str, owner: str, image, stream: bool = False
) -> GenerationRequest:
    return generation_request(
        request_id=request_id, owner=owner, prompt=single_turn(inp.prompt), image=image,
        max_tokens=inp.resolved_max_tokens(), temperature=inp.temperature, top_p=inp.top_p, stream=stream,
    )


def to_output(text: str, done: Completion) -> FalOutput:
    return FalOutput(
        output=text,
        stats=FalStats(num_input_tokens=done.num_input_tokens, num_output_tokens=done.num_output_tokens),
    )


# -- the queue API (docs/api.md §2.5) ---------------------------------------------------------------

_STATUS = {
    JobStatus.QUEUED: "IN_QUEUE",
    JobStatus.RUNNING: "IN_PROGRESS",
}  # every terminal status is COMPLETED: fal reports failures through the result (docs/api.md §0 item 6)


def fal_status(job: Job) -> str:
    return _STATUS.get(job.status, "COMPLETED")


def request_urls(queue_root: str, request_id: str) -> dict[str, str]:
    base = f"{queue_root}{APP_ID}/requests/{request_id}"
    return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}


def log_entry(line: LogLine) -> dict[str, str]:
    stamp = datetime.fromtimestamp(line.timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"message": line.message, "level": "INFO", "source": "USER", "timestamp": stamp}


def status_body(job: Job, queue_root: str, *, with_logs: bool, logs_from: int = 0) -> dict[str, Any]:
    """A status object: `logs` is null unless asked for, else the job's log lines from `logs_from`
    on; a job that ended without a result names its error (the result endpoint replays it)."""
    status = fal_status(job)
    body: dict[str, Any] = {"status": status, "request_id": job.id, **request_urls(queue_root, job.id)}
    if status == "IN_QUEUE":
        body["queue_position"] = job.queue_position or 0
    body["logs"] = [log_entry(line) for line in job.logs[logs_from:]] if with_logs else None
    if status == "COMPLETED":
        ran = job.finished_at - job.started_at if job.started_at and job.finished_at else None
        body["metrics"] = {"inference_time": ran}
        if job.error is not None:
            body["error"], body["error_type"] = summary(job_failure(job.error))
    return body


def submitted_body(job_id: str, queue_root: str, queue_position: int) -> dict[str, Any]:
    return {
        "status": "IN_QUEUE", "request_id": job_id, "gateway_request_id": job_id,
        **request_urls(queue_root, job_id), "queue_position": queue_position, "logs": None, "metrics": {},
    }


def outcome(job: Job) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The result endpoint's answer for a finished job: (status code, body, headers)."""
    if job.result is not None:
        done = Completion(job.result.num_input_tokens, job.result.num_output_tokens, job.result.finish_reason)
        return 200, to_output(job.result.text, done).model_dump(exclude_none=True), {}
    error = job.error or JobError(kind=FailureKind.INTERNAL, message="The request ended without a result.")
    err = job_failure(error, job.input)
    return err.status_code, err.body, err.headers


def webhook_payload(job: Job) -> dict[str, Any]:
    """fal's webhook body (docs/api.md §2.10): the result, or the error the result endpoint replays."""
    code, body, _ = outcome(job)
    ok = code == 200
    return {
        "request_id": job.id, "gateway_request_id": job.id, "status": "OK" if ok else "ERROR",
        "payload": body, "error": None if ok else f"Invalid status code: {code}",
    }
