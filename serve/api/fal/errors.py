"""fal's error model (docs/api.md §2.7): the one table from failure kinds to fal responses."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import ValidationError

from serve.api.errors import Answers, ApiError, render
from serve.api.limits import rate_limit_headers, refusal_detail
from serve.jobs.failures import echo, problems
from serve.jobs.models import FailureKind, JobError, Problem

_DOCS = "https://docs.fal.ai/errors/#"


def _detail(problem: Problem, where: str = "body") -> dict[str, Any]:
    item = {"loc": [where, *problem.loc], "msg": problem.msg, "type": problem.type, "input": problem.input}
    if problem.ctx is not None:
        item["ctx"] = problem.ctx
    if problem.type in ("file_download_error", "image_load_error"):
        item["url"] = _DOCS + problem.type
    return item


def validation_error(exc: ValidationError) -> ApiError:
    """422 with pydantic's errors as fal's detail list (loc under "body")."""
    return _validation(problems(exc))


def _validation(found: list[Problem]) -> ApiError:
    return ApiError(422, {"detail": [_detail(p) for p in found]})


def field_error(field: str, msg: str, error_type: str, value: Any, where: str = "body") -> ApiError:
    # The value as `echo` bounds it, as pydantic's are (`problems`): never a whole data: URI (§2.7).
    problem = Problem(loc=[field], msg=msg, type=error_type, input=echo(value))
    return ApiError(422, {"detail": [_detail(problem, where)]})


def flat_error(status_code: int, detail: str, error_type: str | None = None, **headers: str) -> ApiError:
    body: dict[str, Any] = {"detail": detail}
    headers = {k.replace("_", "-"): v for k, v in headers.items()}
    if error_type:
        body["error_type"] = error_type
        headers["x-fal-error-type"] = error_type
    return ApiError(status_code, body, headers)


def _on_field(name: str, error_type: str):
    """A 422 naming the input field at fault, echoing its value when the input is known."""
    return lambda err, inp: field_error(name, err.message, error_type, (inp or {}).get(name))


def _limited(err: JobError, inp: Mapping[str, Any] | None) -> ApiError:
    adm = err.admission  # a LIMITED failure carries the store's decision (classify)
    if adm.reason == "rate":
        detail = f"Rate limit exceeded ({adm.limit} requests per minute). Please retry after {adm.retry_after} seconds."
    else:  # the bounds every API shares have their own words (docs/bounds.md)
        detail = refusal_detail(adm) or "Concurrency limit exceeded. Please retry later."
    return ApiError(429, {"detail": detail}, rate_limit_headers(adm))


ANSWERS: Answers = {
    # A validation error read back from an older job may have no problems: its message stands alone.
    FailureKind.VALIDATION: lambda err, inp: _validation(
        err.problems or [Problem(loc=[], msg=err.message, type="value_error")]),
    FailureKind.IMAGE_DOWNLOAD: _on_field("image_url", "file_download_error"),
    FailureKind.IMAGE_LOAD: _on_field("image_url", "image_load_error"),
    FailureKind.INPUT: _on_field("prompt", "value_error"),
    FailureKind.LIMITED: _limited,
    FailureKind.TOO_LARGE: lambda err, inp: flat_error(413, err.message, "request_too_large"),
    # The caller's own start timeout ran out: with this header neither client retries.
    FailureKind.START_TIMEOUT: lambda err, inp: flat_error(
        504, "Request timed out", "request_timeout", X_Fal_Request_Timeout_Type="user"),
    FailureKind.CANCELLED: lambda err, inp: flat_error(400, "Request was cancelled", "request_cancelled"),
    FailureKind.UNAVAILABLE: lambda err, inp: flat_error(
        503, "The model runner is unavailable; try again.", "runner_disconnected"),
    FailureKind.STORE_UNAVAILABLE: lambda err, inp: flat_error(
        503, "The request queue is unavailable; try again.", "runner_scheduling_failure"),
    FailureKind.WORKER_LOST: lambda err, inp: flat_error(503, err.message, "runner_disconnected"),
    FailureKind.INTERNAL: lambda err, inp: flat_error(500, "Internal Server Error", "internal_server_error"),
}


def job_failure(error: JobError, inp: Mapping[str, Any] | None = None) -> ApiError:
    """What the result endpoint answers for a job that ended without a result: the error the request
    would have got had it run synchronously (fal's rule)."""
    return render(ANSWERS, error, inp)


def summary(err: ApiError) -> tuple[str, str | None]:
    """(error, error_type) of a failed job's status: the first field error, or the flat detail."""
    detail = err.body.get("detail")
    if isinstance(detail, list) and detail:
        return detail[0].get("msg", ""), detail[0].get("type")
    return str(detail), err.body.get("error_type")
