"""Errors in an API's wire shape, and the route class that answers every failure in that shape.

Each API has one table from `FailureKind` to its answer (`Answers`); a test proves every table covers
every kind, so a new kind cannot fall through to a silent default (docs/architecture.md, "Failures").
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from serve.jobs.failures import classify
from serve.jobs.models import FailureKind, JobError


class ApiError(Exception):
    """An error already in the wire shape of the API it came through."""

    def __init__(self, status_code: int, body: dict, headers: dict[str, str] | None = None):
        super().__init__(f"{status_code}: {body}")
        self.status_code = status_code
        self.body = body
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status_code, headers=self.headers)


# (the failure, the request's input when known: some APIs echo the offending field) -> the answer
Answer = Callable[[JobError, Mapping[str, Any] | None], ApiError]
Answers = Mapping[FailureKind, Answer]


def render(answers: Answers, error: JobError, inp: Mapping[str, Any] | None = None) -> ApiError:
    """A failure (of a request, or stored with a job) in the API's shape: its kind's answer, with Retry-After
    when the failure says when a retry may succeed (a resting engine starting: docs/autoscaling.md)."""
    err = answers[error.kind](error, inp)
    if error.retry_after_s is not None:
        err.headers.setdefault("Retry-After", str(max(1, math.ceil(error.retry_after_s))))
    return err


def answer(answers: Answers, exc: BaseException, inp: Mapping[str, Any] | None = None) -> ApiError:
    """Any failure of a request, in the API's shape: its own ApiError, or its kind's answer."""
    return exc if isinstance(exc, ApiError) else render(answers, classify(exc), inp)


def shaped_errors(answers: Answers) -> type[APIRoute]:
    """A route class whose every failure answers in one API's error shape."""

    class ShapedRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                try:
                    return await handler(request)
                except HTTPException:
                    raise  # FastAPI's own (none of ours raise it): its handlers answer
                except Exception as exc:
                    return answer(answers, exc).response()

            return route

    return ShapedRoute
