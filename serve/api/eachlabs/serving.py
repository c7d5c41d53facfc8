"""Eachlabs' serving layer (docs/api.md §3): create, the blocking run, get, cancel, and its jobs.

Routes (routes.py) read the request and call these; the shared core (serve/api/serving.py) owns
limits and jobs. What is Eachlabs' here is only its shapes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serve.api.body import parse_json
from serve.api.eachlabs.errors import error, error_output, invalid_input
from serve.api.eachlabs.protocol import MODEL, CreatePrediction, LlavaInput, prediction, to_generation_request
from serve.api.limits import rate_limit_headers
from serve.api.serving import accept, read, run_job, send_webhook
from serve.api.services import Services
from serve.auth import Caller
from serve.jobs.models import Admission, CancelOutcome, Job, JobResult, JobStatus
from serve.jobs.runner import LogFn
from serve.telemetry.access import RequestContext


def parse_create(body: bytes) -> CreatePrediction:
    """The create body, checked now (an invalid input is refused, not a failed prediction later)."""
    try:
        data = parse_json(body)  # strict: what json.loads also takes (NaN, "\ud800") could not be read back
    except ValidationError:
        raise error(400, "Invalid request body") from None
    if not isinstance(data, dict):
        raise error(400, "Invalid request body")
    try:
        req = CreatePrediction.model_validate(data)
    except ValidationError as exc:
        raise error(400, f"Invalid request body: {exc.errors(include_url=False)[0]['msg']}") from None
    if not req.model:
        raise error(400, "model field is required")
    if req.model != MODEL:
        raise error(404, "Failed to fetch model: model not found")
    if req.input is None:
        raise error(400, "Invalid input for model: input is required")
    try:
        LlavaInput.model_validate(req.input)
    except ValidationError as exc:
        raise invalid_input(exc) from None
    return req


async def create(services: Services, ctx: RequestContext, caller: Caller, req: CreatePrediction) -> tuple[Job, Admission]:
    job = Job(
        id=ctx.request_id,  # the prediction id is the request's id everywhere
        owner=caller.name,
        api="eachlabs",
        # The model's fields as sent (echoed by GET); fields it ignores are not stored (docs/bounds.md).
        input={name: value for name, value in (req.input or {}).items() if name in LlavaInput.model_fields},
        meta={"version": req.version, "webhook_url": req.webhook_url, "webhook_secret": req.webhook_secret},
        max_concurrent=caller.limits.max_concurrent,
        created_at=0.0,  # the store stamps it
        notify=bool(req.webhook_url),
    )
    # Unfinished predictions count against the concurrency cap: an 11th is refused, not queued.
    return job, await accept(services, ctx, caller, job, cap_pending=True)


def created(job: Job, admission: Admission) -> Response:
    body = {"status": "success", "message": "Prediction created successfully", "predictionID": job.id}
    return JSONResponse(body, headers=rate_limit_headers(admission))


async def run(services: Services, ctx: RequestContext, caller: Caller, req: CreatePrediction, base_url: str) -> Response:
    """The SDK's blocking call: create, then answer with the prediction once it is terminal."""
    job, admission = await create(services, ctx, caller, req)
    try:
        # Brief reads while it runs (the status is all that is looked at), the whole prediction once.
        while not (await services.store.get(job.id, caller.name, brief=True)).status.terminal:
            await asyncio.sleep(services.config.eachlabs.run_poll_s)
    except asyncio.CancelledError:
        await services.store.cancel(job.id, caller.name)  # the caller left: stop the work
        raise
    body = prediction(await services.store.get(job.id, caller.name), base_url,
                      services.config.eachlabs.price_per_second)
    return JSONResponse(body, headers=rate_limit_headers(admission))


async def get(services: Services, ctx: RequestContext, caller: Caller, prediction_id: str, base_url: str) -> Response:
    job = None
    if read(services, ctx, caller, prediction_id):  # now the request's id; reads have a budget of their own
        job = await services.store.get(prediction_id, caller.name)
    if job is None:
        raise error(404, "Prediction not found")
    return JSONResponse(prediction(job, base_url, services.config.eachlabs.price_per_second))


async def cancel(services: Services, ctx: RequestContext, caller: Caller, prediction_id: str) -> Response:
    outcome = await services.store.cancel(prediction_id, caller.name) if read(services, ctx, caller, prediction_id) \
        else CancelOutcome.NOT_FOUND
    if outcome == CancelOutcome.NOT_FOUND:
        raise error(404, "Prediction not found")
    if outcome == CancelOutcome.ALREADY_DONE:
        raise error(400, "Prediction already completed")
    return JSONResponse({"status": "success", "message": "Prediction cancelled successfully"})


def webhook_payload(job: Job) -> dict[str, Any] | None:
    """Eachlabs' webhook body (docs/api.md §3.8): on success and failure only, never on cancellation."""
    if job.status == JobStatus.SUCCEEDED and job.result is not None:
        return {"exec_id": job.id, "flow_id": None, "status": "succeeded", "output": job.result.chunks, "error": ""}
    if job.status == JobStatus.FAILED and job.error is not None:
        failed = {"id": "", "status": "", "output": "", "error": error_output(job.error)}
        return {"exec_id": job.id, "flow_id": None, "status": "failed", "output": [failed], "error": ""}
    return None


class EachlabsExecutor:
    """How Eachlabs predictions run, and their webhook when they finish."""

    def __init__(self, services: Services):
        self._services = services

    async def run(self, job: Job, log: LogFn) -> JobResult:
        inp = LlavaInput.model_validate(job.input)
        build = lambda image: to_generation_request(  # noqa: E731
            inp, request_id=job.id, owner=job.owner, image=image)
        return await run_job(self._services, job, inp.image, build, log)

    def finished(self, job: Job) -> bool:
        url, payload = job.meta.get("webhook_url"), webhook_payload(job)
        if url and payload is not None:
            secret = job.meta.get("webhook_secret")
            send_webhook(self._services, job, url, payload, {"X-Webhook-Secret": secret} if secret else {})
            return True
        return False
