"""fal routes: thin — authenticate, parse, fetch the image, run, shape the answer."""

from __future__ import annotations

import uuid
from typing import Callable

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from serve.api.fal.errors import flat_error, to_fal_error
from serve.api.fal.protocol import APP_ID, FalInput, to_generation_request, to_output
from serve.api.services import ApiError, Services, get_services
from serve.auth import Caller
from serve.engine.types import collect
from serve.jobs.limits import admitted, rate_limit_headers

REQUEST_ID_HEADER = "x-fal-request-id"


class FalRoute(APIRoute):
    """Gives every fal request an id, sent back as `x-fal-request-id` on every response, errors too."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            request.state.request_id = str(uuid.uuid4())
            try:
                response = await handler(request)
            except ApiError as exc:
                response = exc.response()
            response.headers[REQUEST_ID_HEADER] = request.state.request_id
            return response

        return route


router = APIRouter(route_class=FalRoute)


def fal_caller(request: Request, services: Services = Depends(get_services)) -> Caller:
    header = request.headers.get("authorization", "")
    if not header.strip():
        raise flat_error(401, "Authentication is required")
    scheme, _, token = header.strip().partition(" ")
    caller = services.keys.authenticate(token.strip()) if scheme.lower() in ("key", "bearer") else None
    if caller is None:
        raise flat_error(401, "No user found for Key ID and Secret")
    return caller


async def _parse(request: Request) -> FalInput:
    try:
        return FalInput.model_validate_json(await request.body())
    except ValidationError as exc:
        raise to_fal_error(exc) from None


@router.post(f"/{APP_ID}")
async def run(
    request: Request, caller: Caller = Depends(fal_caller), services: Services = Depends(get_services)
) -> Response:
    inp = await _parse(request)  # before the limits: a malformed body costs no quota
    try:
        async with admitted(services.store, caller, services.config.jobs.lease_s) as admission:
            image = await services.media.load(inp.image_url)
            gen = to_generation_request(
                inp, request_id=request.state.request_id, owner=caller.name, image=image, model=services.config.model
            )
            chunks, done = await collect(services.engine.generate(gen))
    except Exception as exc:
        raise to_fal_error(exc, image_url=inp.image_url, prompt=inp.prompt) from None
    output = to_output("".join(chunks), done).model_dump(exclude_none=True)
    return JSONResponse(output, headers=rate_limit_headers(admission))
