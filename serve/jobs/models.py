"""Job records and limit decisions: the data every store backend keeps and returns."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from serve.config import MAX_PENDING, MAX_STORED_BYTES

_ANY = TypeAdapter(Any)  # JSON as the store keeps it, to count its bytes

WINDOW_S = 60.0  # the rate limit's rolling window

# What a read shows of a long string of a job's input: a data: URI is megabytes, its head says what it was.
ABRIDGE_OVER = 256
ABRIDGE_KEEP = 64
# Retry-After of a "pending" or "stored" refusal: room comes when one of the key's jobs starts or ends, which
# no one can predict; a second, like the concurrency cap's.
QUEUE_FULL_RETRY_S = 1.0


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Limits(BaseModel):
    """One key's limits, as the store enforces them."""

    model_config = ConfigDict(frozen=True)

    rate_per_minute: int = Field(gt=0)
    max_concurrent: int = Field(gt=0)
    max_pending: int = Field(MAX_PENDING, gt=0, description="Jobs queued, not yet started.")
    max_stored_bytes: int = Field(MAX_STORED_BYTES, gt=0, description="Bytes of the inputs of unfinished jobs.")


def abridge_long_strings(value: Any) -> Any:
    """A JSON value with every string (keys too) longer than ABRIDGE_OVER characters cut to its first
    ABRIDGE_KEEP characters + "…" + " (N characters)": what reads show of a job's input. Idempotent."""
    if isinstance(value, str):
        return value if len(value) <= ABRIDGE_OVER else f"{value[:ABRIDGE_KEEP]}… ({len(value)} characters)"
    if isinstance(value, dict):
        return {abridge_long_strings(k): abridge_long_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [abridge_long_strings(v) for v in value]
    return value


def input_bytes(job_input: dict[str, Any]) -> int:
    """What a job's full input counts against `max_stored_bytes`: its size as JSON (UTF-8)."""
    return len(_ANY.dump_json(job_input))


class LogLine(BaseModel):
    timestamp: float
    message: str


class JobResult(BaseModel):
    chunks: list[str] = Field(description="Text deltas as the engine streamed them; joined, the answer.")
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(self.chunks)


class Admission(BaseModel):
    """A limit decision; on refusal nothing was recorded (a refused request consumes no quota)."""

    allowed: bool
    reason: str | None = Field(None, description="rate | concurrency | pending | stored, when refused")
    limit: int = Field(description="The key's rate limit per window.")
    max_concurrent: int = Field(description="The key's concurrency cap.")
    remaining: int = Field(description="Requests left in the current window.")
    reset_s: float = Field(description="Seconds until the oldest admission leaves the window.")
    retry_after_s: float = Field(0.0, description="Seconds until a retry can succeed (refusals).")
    slot: str | None = Field(None, description="The concurrency slot taken (sync requests).")
    queue_position: int | None = Field(None, description="Position of an enqueued job.")

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(self.retry_after_s))


class FailureKind(str, Enum):
    """Every way a request or job can fail. `serve.jobs.failures.classify` is the one place that turns an
    exception into one; each API has one table from kind to its wire answer (docs/architecture.md)."""

    VALIDATION = "validation"  # the input does not match the API's schema
    IMAGE_DOWNLOAD = "image_download"  # the image URL could not be fetched
    IMAGE_LOAD = "image_load"  # the bytes are not a usable image, or the reference is malformed
    INPUT = "input"  # the engine refused the request as sent (e.g. the prompt does not fit the context)
    LIMITED = "limited"  # refused by a per-key limit (rate, concurrency, pending, stored); never stored
    TOO_LARGE = "too_large"  # the request body is over http.max_body_bytes; never stored
    START_TIMEOUT = "start_timeout"  # did not start before the caller's start deadline
    CANCELLED = "cancelled"  # cancelled by its owner
    UNAVAILABLE = "unavailable"  # no engine replica could serve it
    STORE_UNAVAILABLE = "store_unavailable"  # the job store could not be reached
    WORKER_LOST = "worker_lost"  # its runner stopped renewing its lease too many times
    INTERNAL = "internal"  # a bug: logged with its traceback, answered without internals


class Problem(BaseModel):
    """One field's validation problem (pydantic's error, JSON-safe; `loc` within the API's input)."""

    loc: list[str | int]
    msg: str
    type: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class JobError(BaseModel):
    """Why a request or job failed, as stored with a job and rendered by each API's table."""

    model_config = ConfigDict(frozen=True)  # shared constants (CANCELLED) must not be mutated

    kind: FailureKind
    message: str = Field(description="Safe to show the caller: says what was wrong, never internals.")
    problems: list[Problem] = Field(default_factory=list, description="validation: each field's problem.")
    admission: Admission | None = Field(None, description="limited: the refused decision (for its headers).")
    retry_after_s: float | None = Field(None, description="unavailable: when a retry may succeed (Retry-After).")


CANCELLED = JobError(kind=FailureKind.CANCELLED, message="Cancelled.")
START_TIMEOUT = JobError(kind=FailureKind.START_TIMEOUT, message="The request did not start before its start timeout.")


def final_status(result: JobResult | None, error: JobError | None) -> JobStatus:
    """The terminal status a runner's outcome stands for."""
    if result is not None:
        return JobStatus.SUCCEEDED
    return JobStatus.CANCELLED if error is not None and error.kind == FailureKind.CANCELLED else JobStatus.FAILED


class Job(BaseModel):
    id: str
    owner: str = Field(description="The owning key's name.")
    api: str = Field(description="Which wire API accepted it (fal, eachlabs): picks the executor.")
    input: dict[str, Any] = Field(
        description="The input as received, from `claim` (for the runner); abridged (`abridge_long_strings`) from "
        "every read, and all the store keeps once the job has ended.")
    meta: dict[str, Any] = Field(default_factory=dict, description="API-specific extras (webhook, version...).")
    max_concurrent: int = Field(description="The owner's concurrency cap when the job was accepted.")
    start_timeout_s: float | None = Field(
        None, description="Seconds the job may wait in the queue before it starts; still queued after that, "
        "it ends failed with kind 'start_timeout'.")
    notify: bool = Field(
        False, description="Announce the job's end to its API (webhooks): when it ends, however it ends, "
        "the store queues it for a runner to hand to the API's executor.")
    status: JobStatus = JobStatus.QUEUED
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = Field(None, description="When a finished job is forgotten (result TTL).")
    attempts: int = 0
    runner: str | None = None
    lease_until: float | None = None
    cancel_requested: bool = False
    logs: list[LogLine] = Field(default_factory=list)
    result: JobResult | None = None
    error: JobError | None = None
    queue_position: int | None = Field(None, description="Jobs ahead of this one while queued (0 = next).")


class CancelOutcome(str, Enum):
    CANCELLED = "cancelled"  # was queued: removed, now terminal
    REQUESTED = "requested"  # is running: its runner aborts it
    ALREADY_DONE = "already_done"
    NOT_FOUND = "not_found"


class LimitExceeded(Exception):
    """Refused by a per-key limit; nothing was counted. Each API renders it in its own error shape."""

    def __init__(self, admission: Admission):
        super().__init__(admission.reason)
        self.admission = admission


class BodyTooLarge(Exception):
    """A request body over the cap (http.max_body_bytes), refused before it was read whole."""

    def __init__(self, limit: int):
        super().__init__(f"The request body is larger than the {limit} bytes this server accepts; send large "
                         f"images by URL, or smaller.")
        self.limit = limit


class StoreUnavailable(RuntimeError):
    """The shared job store cannot be reached, or is full (Redis out of memory). Backends raise it for those
    failures so callers answer 503, not 500; an operation whose reply was lost may have been applied (once)."""


WORKER_LOST = JobError(kind=FailureKind.WORKER_LOST,
                       message="The worker running this request stopped responding; it could not be completed.")
REQUEUED = "Worker lost; re-queued."  # the log line a job gets when reap puts it back in the queue
