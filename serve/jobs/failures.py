"""The one place an exception becomes a `JobError` (docs/architecture.md, "Failures").

Sync requests, streams and jobs all fail through `classify`; each API renders the result with its own
table from `FailureKind` to its wire answer. Unexpected exceptions are logged here, once, with their
traceback, and answered as `internal` without internals.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from pydantic import ValidationError

from serve.engine.types import EngineInputError, EngineUnavailable, StartTimeout
from serve.jobs.models import (
    CANCELLED, BodyTooLarge, FailureKind, JobError, LimitExceeded, Problem, StoreUnavailable, abridge_long_strings,
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


# What an error may echo of a caller's input (fal's field errors, docs/api.md §2.7): enough to recognise it,
# never a whole data: URI or body. Strings are abridged as reads abridge a job's input, and an echo holds at
# most ECHO_VALUES values in all (a container's first ones, then a note of how many it had).
ECHO_VALUES = 32


def echo(value: Any) -> Any:
    """`value` as an error may show it: bounded, and JSON-serialisable (a ctx may hold an exception object,
    a float may be NaN)."""
    return _echo(value, [ECHO_VALUES])


def _echo(value: Any, left: list[int]) -> Any:
    left[0] -= 1
    if isinstance(value, str):
        return abridge_long_strings(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN: an answer holding one could not be sent at all
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if left[0] <= 0:
                out["…"] = f"({len(value)} keys)"
                break
            out[abridge_long_strings(str(key))] = _echo(item, left)
        return out
    if isinstance(value, (list, tuple)):
        items: list[Any] = []
        for item in value:
            if left[0] <= 0:
                items.append(f"… ({len(value)} items)")
                break
            items.append(_echo(item, left))
        return items
    return abridge_long_strings(str(value))


def problems(exc: ValidationError) -> list[Problem]:
    """pydantic's errors, their input and ctx `echo`ed (bounded, JSON-safe)."""
    return [
        Problem(loc=list(err["loc"]), msg=err["msg"], type=err["type"], input=echo(err.get("input")),
                ctx=echo(err["ctx"]) if "ctx" in err else None)
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
            return JobError(kind=kind, message=_SAFE_MESSAGES.get(kind) or str(exc),
                            retry_after_s=getattr(exc, "retry_after_s", None))
    log.error("unexpected failure", exc_info=exc)
    return JobError(kind=FailureKind.INTERNAL, message=INTERNAL_MESSAGE)
