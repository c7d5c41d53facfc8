"""The one place an exception becomes a `JobError` (docs/architecture.md, "Failures").

Sync requests, streams and jobs all fail through `classify`; each API renders the result with its own
table from `FailureKind` to its wire answer. Unexpected exceptions are logged here, once, with their
traceback, and answered as `internal` without internals.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import ValidationError

from serve.engine.types import EngineInputError, EngineUnavailable, StartTimeout
from serve.jobs.models import (
    CANCELLED, BodyTooLarge, FailureKind, JobError, LimitExceeded, Problem, StoreUnavailable,
)
from serve.media.errors import ImageDownloadError, MediaError

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "Internal error while running the request."

# Checked in order: a subclass before its base (ImageDownloadError is a MediaError).
_KINDS: tuple[tuple[type[BaseException], FailureKind], ...] = (
    (ImageDownloadError, FailureKind.IMAGE_DOWNLOAD),
    (MediaError, FailureKind.IMAGE_LOAD),
    (EngineInputError, FailureKind.INPUT),
    (StartTimeout, FailureKind.START_TIMEOUT),
    (EngineUnavailable, FailureKind.UNAVAILABLE),
    (StoreUnavailable, FailureKind.STORE_UNAVAILABLE),
    (BodyTooLarge, FailureKind.TOO_LARGE),
)


# Kinds whose exception text is about our own insides (hosts, actors, processes): callers see these words
# instead (a stored job's message reaches Eachlabs' output and webhooks).
_SAFE_MESSAGES = {
    FailureKind.UNAVAILABLE: "The model is unavailable right now; please retry.",
    FailureKind.STORE_UNAVAILABLE: "The job store could not be reached; please retry.",
}


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


def problems(exc: ValidationError) -> list[Problem]:
    """pydantic's errors, JSON-safe (a ctx may hold an exception object)."""
    return [
        Problem(loc=list(err["loc"]), msg=err["msg"], type=err["type"], input=_json_safe(err.get("input")),
                ctx=_json_safe(err["ctx"]) if "ctx" in err else None)
        for err in exc.errors(include_url=False)
    ]


def classify(exc: BaseException) -> JobError:
    if isinstance(exc, asyncio.CancelledError):
        return CANCELLED
    if isinstance(exc, ValidationError):
        found = problems(exc)
        return JobError(kind=FailureKind.VALIDATION, message=found[0].msg if found else str(exc), problems=found)
    if isinstance(exc, LimitExceeded):
        return JobError(kind=FailureKind.LIMITED, message=f"{exc.admission.reason} limit", admission=exc.admission)
    for cls, kind in _KINDS:
        if isinstance(exc, cls):
            return JobError(kind=kind, message=_SAFE_MESSAGES.get(kind) or str(exc))
    log.error("unexpected failure", exc_info=exc)
    return JobError(kind=FailureKind.INTERNAL, message=INTERNAL_MESSAGE)
