"""fal's serving layer (docs/api.md §2): sync run, SSE stream, the queue's operations and its jobs.

Routes (routes.py) read the request and call these; the shared core (serve/api/serving.py) owns
limits, the engine stream's lifetime and jobs. What is fal's here is only its shapes.
"""

from __future__ import annotations

import asyncio
import math
from contextlib import ExitStack
from typing import Any, AsyncGenerator, AsyncIterator

import httpx
from fastapi import Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serve.api.body import parse_json
from serve.api.errors import ApiError, answer
from serve.api.fal.errors import ANSWERS, field_error, flat_error, summary, validation_error
from serve.api.fal.protocol import (
    FalInput,
    outcome,
    status_body,
    submitted_body,
    to_generation_request,
    to_output,
    webhook_payload,
)
from serve.api.limits import rate_limit_headers
from serve.api.serving import (
    BuildRequest,
    accept,
    complete,
    counting_refusals,
    generation,
    open_generation,
    read,
    run_job,
    send_webhook,
    streamed,
)
from serve.api.services import Services
from serve.api.sse import EventStream, event
from serve.auth import Caller
from serve.engine.types import StreamItem, TextDelta
from serve.jobs.models import CancelOutcome, Job, JobResult
from serve.jobs.runner import LogFn
from serve.net.pinned import url_problem
from serve.telemetry.access import RequestContext

_CANCEL = {
    CancelOutcome.CANCELLED: (200, "OK"),
    CancelOutcome.REQUESTED: (202, "CANCELLATION_REQUESTED"),
    CancelOutcome.ALREADY_DONE: (400, "ALREADY_COMPLETED"),
    CancelOutcome.NOT_FOUND: (404, "NOT_FOUND"),
}


def parse(body: bytes) -> FalInput:
    try:
        return FalInput.model_validate(parse_json(body))  # strict JSON: NaN, deep nesting... are 422s
    except ValidationError as exc:
        raise validation_error(exc) from None


def seconds_to_start(raw: str | None) -> float | None:
    """X-Fal-Request-Timeout: seconds the request may wait before it starts (> 1, as fal requires)."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 1):
        raise field_error("x-fal-request-timeout", "Input should be a number of seconds greater than 1",
                          "greater_than", raw, where="header")
    return value


def _build(request_id: str, owner: str, inp: FalInput, *, stream: bool) -> BuildRequest:
    return lambda image: to_generation_request(inp, request_id=request_id, owner=owner, image=image, stream=stream)


def _failed(exc: Exception, inp: FalInput) -> ApiError:
    return answer(ANSWERS, exc, {"image_url": inp.image_url, "prompt": inp.prompt})


async def run(services: Services, ctx: RequestContext, caller: Caller, inp: FalInput,
              start_timeout_s: float | None) -> Response:
    build = _build(ctx.request_id, caller.name, inp, stream=False)
    try:
        async with generation(services, ctx, caller, inp.image_url, build, stream=False,
                              start_timeout_s=start_timeout_s) as gen:
            chunks, done = await complete(gen, ctx, caller)
    except Exception as exc:
        raise _failed(exc, inp) from None
    output = to_output("".join(chunks), done).model_dump(exclude_none=True)
    return JSONResponse(output, headers=rate_limit_headers(gen.admission))


async def stream(services: Services, ctx: RequestContext, caller: Caller, inp: FalInput,
                 start_timeout_s: float | None) -> Response:
    """SSE of cumulative output (docs/api.md §2.4). Everything that can fail before the first token
    answers as a normal JSON error; the concurrency slot is held until the stream ends."""
    build = _build(ctx.request_id, caller.name, inp, stream=True)
    try:
        gen, end = await open_generation(services, ctx, caller, inp.image_url, build, stream=True,
                                         start_timeout_s=start_timeout_s)
    except Exception as exc:
        raise _failed(exc, inp) from None
    return EventStream(_output_events(streamed(gen, ctx, caller), inp), headers=rate_limit_headers(gen.admission),
                       cleanup=end)


async def _output_events(items: AsyncIterator[StreamItem], inp: FalInput) -> AsyncGenerator[bytes, None]:
    text = ""
    try:
        async for item in items:
            if isinstance(item, TextDelta):
                text += item.text
                yield event({"output": text, "partial": True})
            else:
                yield event(to_output(text, item).model_dump(exclude_none=True))
    except Exception as exc:
        # Mid-stream failure (docs/api.md §2.4): a final event with what was generated and why it stopped.
        message, _ = summary(_failed(exc, inp))
        yield event({"output": text, "partial": False, "error": message})


# -- the queue (docs/api.md §2.5) ---------------------------------------------------------------


async def submit(services: Services, ctx: RequestContext, caller: Caller, body: bytes, *,
                 start_timeout: str | None, webhook: str | None, queue_root: str) -> Response:
    # Checked now, as the sync routes check it (docs/api.md §2.5.1): an invalid input is refused with the
    # same 422 before it costs quota or store space, never stored to fail later.
    inp = parse(body).model_dump(mode="json", exclude_unset=True)
    meta: dict[str, Any] = {}
    if webhook is not None:
        try:
            problem = url_problem(httpx.URL(webhook))
        except httpx.InvalidURL:
            problem = "is not a valid URL"
        if problem:
            raise field_error("fal_webhook", f"The webhook URL {problem}.", "url_parsing", webhook, where="query")
        meta["webhook_url"] = webhook
    job = Job(id=ctx.request_id, owner=caller.name, api="fal", input=inp, meta=meta,
              max_concurrent=caller.limits.max_concurrent, created_at=0.0,
              start_timeout_s=seconds_to_start(start_timeout), notify="webhook_url" in meta)
    # fal's queue never refuses for concurrency (jobs wait their turn); the rate limit applies.
    admission = await accept(services, ctx, caller, job, cap_pending=False)
    return JSONResponse(submitted_body(job.id, queue_root, admission.queue_position or 0),
                        headers=rate_limit_headers(admission))


async def _job(services: Services, ctx: RequestContext, caller: Caller, request_id: str, *, brief: bool) -> Job:
    job = None
    if read(services, ctx, caller, request_id):  # now the response's id; reads have a budget of their own
        job = await services.store.get(request_id, caller.name, brief=brief)
    if job is None:
        raise flat_error(404, "Request not found")
    return job


async def status(services: Services, ctx: RequestContext, caller: Caller, request_id: str, *,
                 queue_root: str, with_logs: bool) -> Response:
    # Brief: a poll needs neither the input nor the result, and a data: URI input can be megabytes.
    job = await _job(services, ctx, caller, request_id, brief=True)
    body = status_body(job, queue_root, with_logs=with_logs)
    return JSONResponse(body, status_code=200 if job.status.terminal else 202)


async def status_stream(services: Services, ctx: RequestContext, caller: Caller, request_id: str, *,
                        queue_root: str, with_logs: bool) -> Response:
    """SSE of status objects on every change, each with only the new log lines; ends with COMPLETED.
    The caller's open streams are capped (docs/bounds.md, "Reads"): each one polls the store."""
    job = await _job(services, ctx, caller, request_id, brief=True)
    poll_s = services.config.fal.status_stream_poll_s
    held = ExitStack()
    with counting_refusals(ctx, caller):
        held.enter_context(services.reads.status_stream(caller.name))

    async def events() -> AsyncGenerator[bytes, None]:
        current, sent, last = job, 0, None
        while current is not None:
            seen = (current.status, current.queue_position, len(current.logs))
            if seen != last:
                body = status_body(current, queue_root, with_logs=with_logs, logs_from=sent)
                sent, last = seen[2], seen  # counted before the yield: lines may arrive while it waits
                yield event(body)
            if current.status.terminal:
                return
            await asyncio.sleep(poll_s)
            current = await services.store.get(request_id, caller.name, brief=True)

    async def release() -> None:
        held.close()

    return EventStream(events(), cleanup=release)


async def result(services: Services, ctx: RequestContext, caller: Caller, request_id: str) -> Response:
    job = await _job(services, ctx, caller, request_id, brief=False)
    if not job.status.terminal:
        raise flat_error(400, "Request is still in progress")  # never 409: Python would retry it 10 times
    code, body, headers = outcome(job)
    return JSONResponse(body, status_code=code, headers=headers)


async def cancel(services: Services, ctx: RequestContext, caller: Caller, request_id: str) -> Response:
    outcome = await services.store.cancel(request_id, caller.name) if read(services, ctx, caller, request_id) \
        else CancelOutcome.NOT_FOUND
    code, state = _CANCEL[outcome]
    return JSONResponse({"status": state}, status_code=code)


class FalExecutor:
    """How fal jobs run (the queue's worker side): the same translation as the sync route."""

    def __init__(self, services: Services):
        self._services = services

    async def run(self, job: Job, log: LogFn) -> JobResult:
        inp = FalInput.model_validate(job.input)
        build = _build(job.id, job.owner, inp, stream=True)
        return await run_job(self._services, job, inp.image_url, build, log)

    def finished(self, job: Job) -> bool:
        if url := job.meta.get("webhook_url"):
            send_webhook(self._services, job, url, webhook_payload(job))
            return True
        return False
