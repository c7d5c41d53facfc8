"""OpenAI's error model (docs/api.md §8.6): `{"error": {"message", "type", "param", "code"}}`, with the
status codes the SDKs map to their exception classes; one table from failure kinds."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import ValidationError

from serve.api.errors import Answers, ApiError
from serve.api.limits import rate_limit_headers
from serve.jobs.failures import problems
from serve.jobs.models import FailureKind, JobError, Problem

INVALID = "invalid_request_error"


def error(status_code: int, message: str, error_type: str, param: str | None = None, code: str | None = None,
          headers: dict[str, str] | None = None) -> ApiError:
    return ApiError(status_code, {"error": {"message": message, "type": error_type, "param": param, "code": code}},
                    headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """400: the SDKs' BadRequestError."""
    return error(400, message, INVALID, param, code)


def param_of(loc: list[str | int]) -> str | None:
    """pydantic's location as OpenAI names a parameter: `messages[0].content[1].image_url.url`
    (union tags, which start with "~", are not part of it)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith("~"):
            out += f".{part}" if out else part
    return out or None


def _invalid(found: list[Problem], fallback: str) -> ApiError:
    if not found:
        return invalid(fallback)
    first = found[0]
    if first.type == "json_invalid":
        return invalid("We could not parse the JSON body of your request: it is not valid JSON.")
    param = param_of(first.loc)
    # Never the offending value: it may be a whole data: URI (or a secret pasted by mistake).
    msg = first.msg.rstrip(".")
    return invalid(f"Invalid '{param}': {msg}." if param else f"{msg}.", param)


def invalid_request(exc: ValidationError) -> ApiError:
    return _invalid(problems(exc), str(exc))


def model_not_found(model: str) -> ApiError:
    return error(404, f"The model '{model[:200]}' does not exist.", INVALID, "model", "model_not_found")


def _image(code: str):
    def answer(err: JobError, inp: Mapping[str, Any] | None) -> ApiError:
        return invalid(err.message, (inp or {}).get("image_param"), code)

    return answer


def _limited(err: JobError, inp: Mapping[str, Any] | None) -> ApiError:
    adm = err.admission  # a LIMITED failure carries the store's decision (classify)
    if adm.reason == "rate":
        message = (f"Rate limit reached: {adm.limit} requests per minute for this key. "
                   f"Please try again in {adm.retry_after}s.")
    else:
        message = f"Too many concurrent requests for this key (limit {adm.max_concurrent}). Please retry later."
    return error(429, message, "requests", None, "rate_limit_exceeded", rate_limit_headers(adm))


def _fixed(status_code: int, message: str, error_type: str, code: str | None = None):
    return lambda err, inp: error(status_code, message, error_type, None, code)


ANSWERS: Answers = {
    FailureKind.VALIDATION: lambda err, inp: _invalid(err.problems, err.message),
    FailureKind.IMAGE_DOWNLOAD: _image("invalid_image_url"),
    FailureKind.IMAGE_LOAD: _image("invalid_image_format"),
    FailureKind.INPUT: lambda err, inp: invalid(err.message, "messages"),
    FailureKind.LIMITED: _limited,
    FailureKind.TOO_LARGE: lambda err, inp: error(413, err.message, INVALID, None, "request_too_large"),
    FailureKind.START_TIMEOUT: _fixed(504, "The request did not start in time. Please retry.", "timeout"),
    FailureKind.CANCELLED: _fixed(400, "The request was cancelled.", INVALID, "cancelled"),
    FailureKind.UNAVAILABLE: _fixed(503, "The model is unavailable right now; please retry.", "server_error",
                                    "service_unavailable"),
    FailureKind.STORE_UNAVAILABLE: _fixed(503, "The limits store is unavailable; please retry.", "server_error",
                                          "service_unavailable"),
    FailureKind.WORKER_LOST: _fixed(503, "The worker serving the request was lost; please retry.", "server_error",
                                    "service_unavailable"),
    FailureKind.INTERNAL: _fixed(500, "The server had an error while processing your request.", "server_error"),
}
