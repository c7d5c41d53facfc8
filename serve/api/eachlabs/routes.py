"""Eachlabs prediction routes: thin — authenticate, validate, enqueue or read the job, shape it."""

from __future__ import annotations

import asyncio
import json
import uuid

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serve.api.eachlabs.errors import error, invalid_input, to_eachlabs_error
from serve.api.eachlabs.protocol import MODEL, CreatePrediction, LlavaInput, prediction
from serve.api.services import Services, get_services, shaped_errors
from serve.auth import Caller
from serve.jobs.limits import LimitExceeded, rate_limit_headers
from serve.jobs.models import Admission, CancelOutcome, Job

RUN_POLL_S = 0.1

router = APIRouter(route_class=shaped_errors(to_eachlabs_error))  # failures answer {"error": ...}


async def each_caller(request: Request, services: Services = Depends(get_services)) -> Caller:
    # X-API-Key (any case: HTTP header names are case-insensitive) or Authorization: Bearer.
    key = request.headers.get("x-api-key", "").strip()
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if not key and scheme.lower() == "bearer":
        key = token.strip()
    caller = services.keys.authenticate(key) if key else None
    if caller is None:
        raise error(401, "Invalid or missing API key")
    request.state.key_name = caller.name
    return caller


def _base_url(request: Request, services: Services) -> str:
    return services.config.http.public_base_url or str(request.base_url)


async def _create(request: Request, caller: Caller, services: Services) -> tuple[Job, Admission]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise error(400, "Invalid request body") from None
    if not isinstance(body, dict):
        raise error(400, "Invalid request body")
    try:
        req = CreatePrediction.model_validate(body)
    except ValidationError as exc:
        raise error(400, f"Invalid request body: {exc.errors(include_url=False)[0]['msg']}") from None
    if not req.model:
        raise error(400, "model field is required")
    if req.model != MODEL:
        raise error(404, "Failed to fetch model: model not found")
    if req.input is None:
        raise error(400, "Invalid input for model: input is required")
    try:
        LlavaInput.model_validate(req.input)  # refused now, not as a failed prediction later
    except ValidationError as exc:
        raise invalid_input(exc) from None
    request.state.request_id = job_id = str(uuid.uuid4())  # the prediction id is the request's id everywhere
    job = Job(
        id=job_id,
        owner=caller.name,
        api="eachlabs",
        input=req.input,
        meta={"version": req.version, "webhook_url": req.webhook_url, "webhook_secret": req.webhook_secret},
        max_concurrent=caller.limits.max_concurrent,
        created_at=0.0,  # the store stamps it
        notify=bool(req.webhook_url),
    )
    # Unfinished predictions count against the concurrency cap: an 11th is refused, not queued.
    admission = await services.store.enqueue(job, caller.limits, cap_pending=True)
    if not admission.allowed:
        raise LimitExceeded(admission, caller.name)
    return job, admission


@router.post("/v1/prediction")
@router.post("/v1/prediction/")
async def create(
    request: Request, caller: Caller = Depends(each_caller), services: Services = Depends(get_services)
) -> Response:
    job, admission = await _create(request, caller, services)
    body = {"status": "success", "message": "Prediction created successfully", "predictionID": job.id}
    return JSONResponse(body, headers=rate_limit_headers(admission))


@router.post("/v1/prediction/run")
async def run(
    request: Request, caller: Caller = Depends(each_caller), services: Services = Depends(get_services)
) -> Response:
    """The SDK's blocking call: create, then answer with the prediction once it is terminal."""
    job, admission = await _create(request, caller, services)
    try:
        while not (current := await services.store.get(job.id, caller.name)).status.terminal:
            await asyncio.sleep(RUN_POLL_S)
    except asyncio.CancelledError:
        await services.store.cancel(job.id, caller.name)  # the caller left: stop the work
        raise
    body = prediction(current, _base_url(request, services), services.config.eachlabs.price_per_second)
    return JSONResponse(body, headers=rate_limit_headers(admission))


@router.get("/v1/prediction/{prediction_id}")
@router.get("/v1/prediction/{prediction_id}/")
async def get(
    prediction_id: str,
    request: Request,
    caller: Caller = Depends(each_caller),
    services: Services = Depends(get_services),
) -> Response:
    job = await services.store.get(prediction_id, caller.name)  # polls never count against limits
    if job is None:
        raise error(404, "Prediction not found")
    return JSONResponse(prediction(job, _base_url(request, services), services.config.eachlabs.price_per_second))


@router.post("/v1/prediction/{prediction_id}/cancel")
async def cancel(
    prediction_id: str, caller: Caller = Depends(each_caller), services: Services = Depends(get_services)
) -> Response:
    outcome = await services.store.cancel(prediction_id, caller.name)
    if outcome == CancelOutcome.NOT_FOUND:
        raise error(404, "Prediction not found")
    if outcome == CancelOutcome.ALREADY_DONE:
        raise error(400, "Prediction already completed")
    return JSONResponse({"status": "success", "message": "Prediction cancelled successfully"})


@router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def not_found(rest: str) -> Response:
    raise error(404, "Not found")
