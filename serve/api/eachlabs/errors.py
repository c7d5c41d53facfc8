"""Eachlabs' error model (api-spec §3): `{"error": "..."}` with the documented status codes."""

from __future__ import annotations

import logging

from pydantic import ValidationError

from serve.api.services import ApiError
from serve.jobs.limits import LimitExceeded, rate_limit_headers
from serve.telemetry.metrics import metrics
from serve.jobs.store import StoreUnavailable

log = logging.getLogger(__name__)


def error(status_code: int, message: str, headers: dict[str, str] | None = None) -> ApiError:
    return ApiError(status_code, {"error": message}, headers)


def invalid_input(exc: ValidationError) -> ApiError:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "input"
    return error(400, f"Invalid input for model: {where}: {first['msg']}")


def to_eachlabs_error(exc: Exception) -> ApiError:
    """Map any failure of an Eachlabs request to its response."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, LimitExceeded):
        adm = exc.admission
        metrics().rate_limited("eachlabs", exc.owner, adm.reason)
        if adm.reason == "rate":
            message = f"Rate limit exceeded. Please retry after {adm.retry_after} seconds."
        else:
            message = f"Too many concurrent predictions (limit {adm.max_concurrent}). Please retry later."
        return error(429, message, rate_limit_headers(adm))
    if isinstance(exc, StoreUnavailable):
        return error(503, "The prediction queue is unavailable; please retry.")
    log.exception("unexpected error in an Eachlabs request")
    return error(500, "Internal server error")
