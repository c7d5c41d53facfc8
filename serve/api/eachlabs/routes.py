"""Eachlabs prediction routes (docs/api.md §3): read the request, call the serving layer, return."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from serve.api.body import request_body
from serve.api.context import api_name, context, operation
from serve.api.eachlabs import serving
from serve.api.eachlabs.errors import ANSWERS, error
from serve.api.errors import shaped_errors
from serve.api.paths import ANY_PATH
from serve.api.services import Services, get_services
from serve.auth import Caller, credentials

# Failures answer {"error": ...}; every route is the Eachlabs API's.
router = APIRouter(route_class=shaped_errors(ANSWERS), dependencies=[Depends(api_name("eachlabs"))])


async def each_caller(request: Request, services: Services = Depends(get_services)) -> Caller:
    # X-API-Key (any case: HTTP header names are case-insensitive) or Authorization: Bearer.
    key = request.headers.get("x-api-key", "").strip()
    scheme, token = credentials(request.headers.get("authorization", ""))
    if not key and scheme == "bearer":
        key = token
    caller = services.keys.authenticate(key) if key else None
    if caller is None:
        raise error(401, "Invalid or missing API key")
    context(request).key_name = caller.name
    return caller


def base_url(request: Request, services: Services) -> str:
    return services.config.http.public_base_url or str(request.base_url)


@router.post("/v1/prediction", dependencies=[Depends(operation("create"))])
@router.post("/v1/prediction/", dependencies=[Depends(operation("create"))])
async def create(
    request: Request, caller: Caller = Depends(each_caller), services: Services = Depends(get_services),
    body: bytes = Depends(request_body),
) -> Response:
    req = serving.parse_create(body)
    job, admission = await serving.create(services, context(request), caller, req)
    return serving.created(job, admission)


@router.post("/v1/prediction/run", dependencies=[Depends(operation("run"))])
async def run(
    request: Request, caller: Caller = Depends(each_caller), services: Services = Depends(get_services),
    body: bytes = Depends(request_body),
) -> Response:
    req = serving.parse_create(body)
    return await serving.run(services, context(request), caller, req, base_url(request, services))


@router.get("/v1/prediction/{prediction_id}", dependencies=[Depends(operation("get"))])
@router.get("/v1/prediction/{prediction_id}/", dependencies=[Depends(operation("get"))])
async def get(
    prediction_id: str, request: Request, caller: Caller = Depends(each_caller),
    services: Services = Depends(get_services),
) -> Response:
    return await serving.get(services, context(request), caller, prediction_id, base_url(request, services))


@router.post("/v1/prediction/{prediction_id}/cancel", dependencies=[Depends(operation("cancel"))])
async def cancel(
    prediction_id: str, request: Request, caller: Caller = Depends(each_caller),
    services: Services = Depends(get_services),
) -> Response:
    return await serving.cancel(services, context(request), caller, prediction_id)


# Every other path and method under /v1/ (docs/api.md §1.2), in Eachlabs' shape; a CORS preflight never gets
# here (the middleware answers it).
@router.api_route(f"/v1/{{rest:{ANY_PATH}}}",
                  methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"],
                  dependencies=[Depends(operation("not_found"))])
async def not_found(rest: str) -> Response:
    raise error(404, "Not found")
