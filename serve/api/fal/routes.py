"""fal routes (api-spec §2): thin — authenticate, parse, then run, stream, or go through the queue.

Which of run and submit a `POST /fal-ai/llavav15-13b` is, and the request id every response
carries, were decided by `serve.api.fal.dispatch` before routing.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import AsyncExitStack
from typing import Any, AsyncGenerator, AsyncIterator

import httpx
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError

from serve.api.fal.errors import field_error, flat_error, summary, to_fal_error, validation_error
from serve.api.fal.protocol import (
    APP_ID,
    FalInput,
    outcome,
    status_body,
    submitted_body,
    to_generation_request,
    to_output,
)
from serve.api.services import Services, get_services, shaped_errors
from serve.api.sse import EventStream, event
from serve.auth import Caller
from serve.engine.types import StreamItem, TextDelta, collect, started
from serve.jobs.limits import LimitExceeded, admitted, rate_limit_headers
from serve.jobs.models import CancelOutcome, Job
from serve.media.fetch import url_problem
from serve.telemetry.metrics import metrics


router = APIRouter(route_class=shaped_errors(to_fal_error))  # every failure in fal's shape (§2.7)
REQUEST = f"/{APP_ID}/requests/{{request_id}}"
_OBJECT = TypeAdapter(dict[str, Any])
_CANCEL = {
    CancelOutcome.CANCELLED: (200, "OK"),
    CancelOutcome.REQUESTED: (202, "CANCELLATION_REQUESTED"),
    CancelOutcome.ALREADY_DONE: (400, "ALREADY_COMPLETED"),
    CancelOutcome.NOT_FOUND: (404, "NOT_FOUND"),
}


async def fal_caller(request: Request, services: Services = Depends(get_services)) -> Caller:
    header = request.headers.get("authorization", "")
    if not header.strip():
        raise flat_error(401, "Authentication is required")
    scheme, _, token = header.strip().partition(" ")
    caller = services.keys.authenticate(token.strip()) if scheme.lower() in ("key", "bearer") else None
    if caller is None:
        raise flat_error(401, "No user found for Key ID and Secret")
    request.state.key_name = caller.name
    return caller


async def _parse(request: Request) -> FalInput:
    try:
        return FalInput.model_validate_json(await request.body())
    except ValidationError as exc:
        raise to_fal_error(exc) from None


def _start_timeout(request: Request) -> float | None:
    """X-Fal-Request-Timeout: seconds the request may wait before it starts (> 1, as fal requires)."""
    raw = request.headers.get("x-fal-request-timeout")
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


def _queue_root(request: Request, services: Services) -> str:
    """Where the caller reaches the queue, for the URLs in status objects (api-spec §2.5.1)."""
    if services.config.fal.queue_base_url:
        return services.config.fal.queue_base_url.rstrip("/") + "/"
    via = request.state.fal.via
    if via == "proxy":
        return "https://queue.fal.run/"  # the JS client ignores these URLs and rebuilds fal's own
    base = str(request.base_url)
    return base if via == "host" else f"{base}queue/"


async def _begin(
    request: Request, caller: Caller, services: Services, inp: FalInput, timeout_s: float | None, stream: bool
) -> AsyncGenerator[StreamItem, None]:
    """Fetch the image and start generating; the start timeout counts from the request's arrival."""
    arrived = time.monotonic()
    image = await services.media.load(inp.image_url)
    gen = to_generation_request(inp, request_id=request.state.request_id, owner=caller.name, image=image,
                                model=services.config.model, stream=stream)
    left = None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - arrived))
    items = await started(services.engine.generate(gen), left)
    metrics().first_token("fal", "stream" if stream else "sync", time.monotonic() - arrived)
    return items


@router.post(f"/{APP_ID}")
async def run_or_submit(
    request: Request, caller: Caller = Depends(fal_caller), services: Services = Depends(get_services)
) -> Response:
    if request.state.fal.queue:
        return await _submit(request, caller, services)
    inp = await _parse(request)  # before the limits: a malformed body costs no quota
    timeout_s = _start_timeout(request)
    try:
        async with admitted(services.store, caller, services.config.jobs.lease_s) as admission:
            items = await _begin(request, caller, services, inp, timeout_s, stream=False)
            chunks, done = await collect(items)
    except Exception as exc:
        raise to_fal_error(exc, image_url=inp.image_url, prompt=inp.prompt) from None
    metrics().generated("fal", caller.name, done.num_input_tokens, done.num_output_tokens)
    output = to_output("".join(chunks), done).model_dump(exclude_none=True)
    return JSONResponse(output, headers=rate_limit_headers(admission))


@router.post(f"/{APP_ID}/stream")
async def stream(
    request: Request, caller: Caller = Depends(fal_caller), services: Services = Depends(get_services)
) -> Response:
    """SSE of cumulative output (api-spec §2.4). Everything that can fail before the first token
    answers as a normal JSON error; the concurrency slot is held until the stream ends."""
    inp = await _parse(request)
    timeout_s = _start_timeout(request)
    held = AsyncExitStack()
    try:
        admission = await held.enter_async_context(admitted(services.store, caller, services.config.jobs.lease_s))
        items = await _begin(request, caller, services, inp, timeout_s, stream=True)
    except Exception as exc:
        await held.aclose()
        raise to_fal_error(exc, image_url=inp.image_url, prompt=inp.prompt) from None

    async def cleanup() -> None:
        try:
            await items.aclose()  # a client that left stops the generation
        finally:
            await held.aclose()

    events = _output_events(items, inp, caller.name)
    return EventStream(events, headers=rate_limit_headers(admission), cleanup=cleanup)


async def _output_events(items: AsyncIterator[StreamItem], inp: FalInput, key: str) -> AsyncGenerator[bytes, None]:
    text = ""
    try:
        async for item in items:
            if isinstance(item, TextDelta):
                text += item.text
                yield event({"output": text, "partial": True})
            else:
                metrics().generated("fal", key, item.num_input_tokens, item.num_output_tokens)
                yield event(to_output(text, item).model_dump(exclude_none=True))
                return
        raise RuntimeError("engine stream ended without a completion")
    except Exception as exc:
        # Mid-stream failure (api-spec §2.4): a final event with what was generated and why it stopped.
        message, _ = summary(to_fal_error(exc, image_url=inp.image_url, prompt=inp.prompt))
        yield event({"output": text, "partial": False, "error": message})


# -- queue (api-spec §2.5) ----------------------------------------------------------------------


async def _submit(request: Request, caller: Caller, services: Services) -> Response:
    # Only an unreadable body is refused here: like fal, a bad input is accepted and the job ends
    # with the validation error, replayed by the result endpoint.
    try:
        body = _OBJECT.validate_json(await request.body())
    except ValidationError as exc:
        raise validation_error(exc) from None
    meta: dict[str, Any] = {}
    if (webhook := request.query_params.get("fal_webhook")) is not None:
        try:
            problem = url_problem(httpx.URL(webhook))
        except httpx.InvalidURL:
            problem = "is not a valid URL"
        if problem:
            raise field_error("fal_webhook", f"The webhook URL {problem}.", "url_parsing", webhook, where="query")
        meta["webhook_url"] = webhook
    job = Job(
        id=request.state.request_id, owner=caller.name, api="fal", input=body, meta=meta,
        max_concurrent=caller.limits.max_concurrent, created_at=0.0, start_timeout_s=_start_timeout(request),
        notify="webhook_url" in meta,
    )
    # fal's queue never refuses for concurrency (jobs wait their turn); the rate limit applies.
    admission = await services.store.enqueue(job, caller.limits, cap_pending=False)
    if not admission.allowed:
        raise LimitExceeded(admission, caller.name)
    body = submitted_body(job.id, _queue_root(request, services), admission.queue_position or 0)
    return JSONResponse(body, headers=rate_limit_headers(admission))


async def _job(
    request_id: str, request: Request, caller: Caller, services: Services, *, brief: bool = False
) -> Job:
    request.state.request_id = request_id  # the id on the response is the job's
    job = await services.store.get(request_id, caller.name, brief=brief)  # reads never count against limits
    if job is None:
        raise flat_error(404, "Request not found")
    return job


def _logs_flag(request: Request) -> bool:
    return request.query_params.get("logs", "").lower() in ("1", "true")


@router.get(f"{REQUEST}/status")
async def status(
    request_id: str, request: Request, caller: Caller = Depends(fal_caller), services: Services = Depends(get_services)
) -> Response:
    # Brief: a poll needs neither the input nor the result, and a data: URI input can be megabytes.
    job = await _job(request_id, request, caller, services, brief=True)
    body = status_body(job, _queue_root(request, services), with_logs=_logs_flag(request))
    return JSONResponse(body, status_code=200 if job.status.terminal else 202)


@router.get(f"{REQUEST}/status/stream")
async def status_stream(
    request_id: str, request: Request, caller: Caller = Depends(fal_caller), services: Services = Depends(get_services)
) -> Response:
    """SSE of status objects on every change, each with only the new log lines; ends with COMPLETED."""
    job = await _job(request_id, request, caller, services, brief=True)
    root, with_logs = _queue_root(request, services), _logs_flag(request)
    poll_s = services.config.fal.status_stream_poll_s

    async def events() -> AsyncGenerator[bytes, None]:
        current, sent, last = job, 0, None
        while current is not None:
            seen = (current.status, current.queue_position, len(current.logs))
            if seen != last:
                body = status_body(current, root, with_logs=with_logs, logs_from=sent)
                sent, last = seen[2], seen  # counted before the yield: lines may arrive while it waits
                yield event(body)
            if current.status.terminal:
                return
            await asyncio.sleep(poll_s)
            current = await services.store.get(request_id, caller.name, brief=True)

    return EventStream(events())


@router.get(REQUEST)
async def result(
    request_id: str, request: Request, caller: Caller = Depends(fal_caller), services: Services = Depends(get_services)
) -> Response:
    job = await _job(request_id, request, caller, services)
    if not job.status.terminal:
        raise flat_error(400, "Request is still in progress")  # never 409: Python would retry it 10 times
    code, body, headers = outcome(job)
    return JSONResponse(body, status_code=code, headers=headers)


@router.put(f"{REQUEST}/cancel")
async def cancel(
    request_id: str, request: Request, caller: Caller = Depends(fal_caller), services: Services = Depends(get_services)
) -> Response:
    request.state.request_id = request_id
    code, status = _CANCEL[await services.store.cancel(request_id, caller.name)]
    return JSONResponse({"status": status}, status_code=code)
