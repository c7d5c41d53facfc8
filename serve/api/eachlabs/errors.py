"""Eachlabs' error model (docs/api.md §3): `{"error": "..."}` with the documented status codes, and the
error codes a failed prediction reports. One table each, from failure kinds."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import ValidationError

from serve.api.errors import Answers, ApiError
from serve.api.limits import rate_limit_headers, refusal_detail
from serve.jobs.failures import problems
from serve.jobs.models import FailureKind, JobError, Problem


def error(status_code: int, message: str, headers: dict[str, str] | None = None) -> ApiError:
    return ApiError(status_code, {"error": message}, headers)


def _invalid(found: list[Problem], fallback: str) -> ApiError:
    if not found:
        return error(400, f"Invalid input for model: {fallback}")
    where = ".".join(str(p) for p in found[0].loc) or "input"
    return error(400, f"Invalid input for model: {where}: {found[0].msg}")


def invalid_input(exc: ValidationError) -> ApiError:
    return _invalid(problems(exc), str(exc))


def _limited(err: JobError, inp: Mapping[str, Any] | None) -> ApiError:
    adm = err.admission  # a LIMITED failure carries the store's decision (classify)
    if adm.reason == "rate":
        message = f"Rate limit exceeded. Please retry after {adm.retry_after} seconds."
    else:  # the bounds every API shares have their own words (docs/bounds.md)
        message = refusal_detail(adm) or (
            f"Too many concurrent predictions (limit {adm.max_concurrent}). Please retry later.")
    return error(429, message, rate_limit_headers(adm))


def _fixed(status_code: int, message: str):
    return lambda err, inp: error(status_code, message)


def _bad_input(err: JobError, inp: Mapping[str, Any] | None) -> ApiError:
    return error(400, f"Invalid input for model: {err.message}")


# The HTTP answer of a failed Eachlabs request (a prediction's own failure is in its output: ERROR_CODES).
ANSWERS: Answers = {
    FailureKind.VALIDATION: lambda err, inp: _invalid(err.problems, err.message),
    FailureKind.IMAGE_DOWNLOAD: _bad_input,
    FailureKind.IMAGE_LOAD: _bad_input,
    FailureKind.INPUT: _bad_input,
    FailureKind.LIMITED: _limited,
    FailureKind.TOO_LARGE: lambda err, inp: error(413, err.message),
    FailureKind.START_TIMEOUT: _fixed(504, "The prediction did not start in time. Please retry."),
    FailureKind.CANCELLED: _fixed(400, "Prediction was cancelled"),
    FailureKind.UNAVAILABLE: _fixed(503, "The model is unavailable; please retry."),
    FailureKind.STORE_UNAVAILABLE: _fixed(503, "The prediction queue is unavailable; please retry."),
    FailureKind.WORKER_LOST: _fixed(503, "The worker running the prediction was lost; please retry."),
    FailureKind.INTERNAL: _fixed(500, "Internal server error"),
}

# Failure kinds -> Eachlabs V1 error codes, in a failed prediction's output.
ERROR_CODES: Mapping[FailureKind, str] = {
    FailureKind.VALIDATION: "INPUT_VALIDATION_ERROR",
    FailureKind.IMAGE_DOWNLOAD: "INPUT_DOWNLOAD_ERROR",
    FailureKind.IMAGE_LOAD: "INPUT_VALIDATION_ERROR",
    FailureKind.INPUT: "INPUT_VALIDATION_ERROR",
    FailureKind.LIMITED: "PROVIDER_FAILED",
    FailureKind.TOO_LARGE: "INPUT_VALIDATION_ERROR",
    FailureKind.START_TIMEOUT: "EXECUTION_TIMEOUT",
    FailureKind.CANCELLED: "PROVIDER_FAILED",
    FailureKind.UNAVAILABLE: "PROVIDER_SERVER_ERROR",
    FailureKind.STORE_UNAVAILABLE: "PROVIDER_SERVER_ERROR",
    FailureKind.WORKER_LOST: "WORKER_LOST",
    FailureKind.INTERNAL: "PROVIDER_FAILED",
}


def error_output(err: JobError) -> dict[str, str]:
    return {"error_code": ERROR_CODES[err.kind], "error_message": err.message}
