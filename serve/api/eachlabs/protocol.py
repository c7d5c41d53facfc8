"""Eachlabs `llava-13b` prediction API wire models (docs/api.md §3) and their translation."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from serve.api.chat import single_turn
from serve.api.eachlabs.errors import error_output
from serve.api.translate import generation_request
from serve.engine.types import GenerationRequest
from serve.jobs.models import Job, JobStatus

MODEL = "llava-13b"
_HEADER_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def _integral(value: Any) -> Any:
    # The documented example sends "1024"; "1024.0" and 1024.0 are the same count.
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else value
    return value


class LlavaInput(BaseModel):
    """Replicate llava-13b's inputs: names, defaults and ranges; numbers may come as strings, finite ones
    ("NaN" and "Infinity" are refused as JSON's NaN is: docs/api.md §1.4)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    image: str = Field(description="http(s) URL or data: URI of the image.")
    prompt: str = Field(description="The question or instruction about the image.")
    top_p: float = Field(1.0, ge=0, le=1, description="Nucleus sampling mass.")
    temperature: float = Field(0.2, ge=0, description="Sampling temperature; 0 is greedy.")
    max_tokens: Annotated[int, BeforeValidator(_integral)] = Field(
        1024, ge=1, description="Most tokens to generate (the context length caps it too)."
    )


class CreatePrediction(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. fallback_selector: accepted, unused

    model: str | None = None
    version: str | None = Field(None, description="Accepted and echoed; one version is served.")
    input: dict[str, Any] | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None

    @field_validator("webhook_secret")
    @classmethod
    def _header_value(cls, value: str | None) -> str | None:
        # Sent verbatim as X-Webhook-Secret (docs/api.md §3.8): one an HTTP client can send, else refused now
        # rather than every delivery failing later.
        if value and not _HEADER_VALUE.fullmatch(value):
            raise ValueError("webhook_secret must be printable ASCII, without leading or trailing spaces")
        return value


STATUSES = {
    JobStatus.QUEUED: "created",
    JobStatus.SUCCEEDED: "success",
    JobStatus.FAILED: "error",
    JobStatus.CANCELLED: "cancelled",
}


def to_generation_request(
    inp: LlavaInput, *, request_id: str, owner: str, image
) -> GenerationRequest:
    # Streamed: the output is the list of chunks as the engine streamed them.
    return generation_request(
        request_id=request_id, owner=owner, prompt=single_turn(inp.prompt), image=image,
        max_tokens=inp.max_tokens, temperature=inp.temperature, top_p=inp.top_p, stream=True,
    )


def status_of(job: Job) -> str:
    if job.status == JobStatus.RUNNING:
        # Starting until the image is in and generation begins.
        return "processing" if any(line.message == "Generating" for line in job.logs) else "starting"
    return STATUSES[job.status]


def prediction(job: Job, base_url: str, price_per_second: float) -> dict[str, Any]:
    """The prediction object of §3.3; failures are HTTP 200 with an error output."""
    metrics: dict[str, float] = {}
    if job.status.terminal and job.started_at is not None and job.finished_at is not None:
        predict_time = round(job.finished_at - job.started_at, 3)
        metrics = {"predict_time": predict_time, "cost": round(predict_time * price_per_second, 6)}
    output: Any = None
    if job.status == JobStatus.SUCCEEDED and job.result is not None:
        output = job.result.chunks
    elif job.status == JobStatus.FAILED and job.error is not None:
        output = error_output(job.error)
    url = f"{base_url.rstrip('/')}/v1/prediction/{job.id}"
    return {
        "id": job.id,
        "version": job.meta.get("version"),
        "input": job.input,
        "status": status_of(job),
        "output": output,
        "logs": None,
        "metrics": metrics,
        "urls": {"get": url, "cancel": f"{url}/cancel"},
    }
