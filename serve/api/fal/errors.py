"""fal's error model (api-spec §2.7): the one place that turns failures into fal responses."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from serve.api.services import ApiError
from serve.engine.types import EngineInputError, EngineUnavailable, StartTimeout
from serve.jobs.limits import LimitExceeded, rate_limit_headers
from serve.jobs.models import JobError
from serve.jobs.store import StoreUnavailable
from serve.telemetry.metrics import metrics
from serve.media.intake import ImageDownloadError, MediaError

log = logging.getLogger(__name__)

_DOCS = "https://docs.fal.ai/errors/#"


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


def validation_error(exc: ValidationError) -> ApiError:
    """422 with pydantic's errors as fal's detail list (loc under "body")."""
    detail = []
    for err in exc.errors(include_url=False):
        item = {"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"], "input": _json_safe(err["input"])}
        if "ctx" in err:
            item["ctx"] = _json_safe(err["ctx"])
        detail.append(item)
    return ApiError(422, {"detail": detail})


def field_error(field: str, msg: str, error_type: str, value: Any, where: str = "body") -> ApiError:
    item = {"loc": [where, field], "msg": msg, "type": error_type, "input": _json_safe(value)}
    if error_type in ("file_download_error", "image_load_error"):
        item["url"] = _DOCS + error_type
    return ApiError(422, {"detail": [item]})


def flat_error(status_code: int, detail: str, error_type: str | None = None, **headers: str) -> ApiError:
    body: dict[str, Any] = {"detail": detail}
    headers = {k.replace("_", "-"): v for k, v in headers.items()}
    if error_type:
        body["error_type"] = error_type
        headers["x-fal-error-type"] = error_type
    return ApiError(status_code, body, headers)


def start_timed_out() -> ApiError:
    # The caller's own start timeout ran out: with this header neither client retries.
    return flat_error(504, "Request timed out", "request_timeout", X_Fal_Request_Timeout_Type="user")


def job_failure(error: JobError) -> ApiError:
    """What the result endpoint answers for a job that ended without a result: the original error
    of the request, replayed (fal's rule), or the error standing for how the job ended."""
    if isinstance(error.detail, dict) and "status_code" in error.detail:
        return ApiError(error.detail["status_code"], error.detail["body"], error.detail.get("headers"))
    if error.kind == "cancelled":
        return flat_error(400, "Request was cancelled", "request_cancelled")
    if error.kind == "start_timeout":
        return start_timed_out()
    if error.kind == "worker_lost":
        return flat_error(503, error.message, "runner_disconnected")
    return flat_error(500, "Internal Server Error", "internal_server_error")


def summary(err: ApiError) -> tuple[str, str | None]:
    """(error, error_type) of a failed job's status: the first field error, or the flat detail."""
    detail = err.body.get("detail")
    if isinstance(detail, list) and detail:
        return detail[0].get("msg", ""), detail[0].get("type")
    return str(detail), err.body.get("error_type")


def to_fal_error(exc: Exception, *, image_url: str | None = None, prompt: str | None = None) -> ApiError:
    """Map any failure of a fal request to its fal response."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationError):
        return validation_error(exc)
    if isinstance(exc, ImageDownloadError):
        return field_error("image_url", str(exc), "file_download_error", image_url)
    if isinstance(exc, MediaError):
        return field_error("image_url", str(exc), "image_load_error", image_url)
    if isinstance(exc, EngineInputError):
        return field_error("prompt", str(exc), "value_error", prompt)
    if isinstance(exc, LimitExceeded):
        adm = exc.admission
        metrics().rate_limited("fal", exc.owner, adm.reason)
        if adm.reason == "rate":
            detail = f"Rate limit exceeded ({adm.limit} requests per minute). Please retry after {adm.retry_after} seconds."
        else:
            detail = "Concurrency limit exceeded. Please retry later."
        return ApiError(429, {"detail": detail}, rate_limit_headers(adm))
    if isinstance(exc, StartTimeout):
        return start_timed_out()
    if isinstance(exc, EngineUnavailable):
        return flat_error(503, "The model runner is unavailable; try again.", "runner_disconnected")
    if isinstance(exc, StoreUnavailable):
        return flat_error(503, "The request queue is unavailable; try again.", "runner_scheduling_failure")
    log.exception("unexpected error in a fal request")
    return flat_error(500, "Internal Server Error", "internal_server_error")
