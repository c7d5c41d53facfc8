"""fal routes (docs/api.md §2): read the request, call fal's serving layer (serving.py), return.

Which of run and submit a `POST /fal-ai/llavav15-13b` is was decided by `serve.api.fal.dispatch`
before routing, which also puts the request id (the context's) on every fal response.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from serve.api.body import request_body
from serve.api.context import api_name, context, operation
from serve.api.errors import shaped_errors
from serve.api.fal import serving
from serve.api.fal.errors import ANSWERS, flat_error
from serve.api.fal.protocol import APP_ID
from serve.api.services import Services, get_services
from serve.auth import Caller, credentials

# Every failure in fal's shape (docs/api.md §2.7); every route is the fal API's.
router = APIRouter(route_class=shaped_errors(ANSWERS), dependencies=[Depends(api_name("fal"))])
REQUEST = f"/{APP_ID}/requests/{{request_id}}"


async def fal_caller(request: Request, services: Services = Depends(get_services)) -> Caller:
    header = request.headers.get("authorization", "")
    if not header.strip():
        raise flat_error(401, "Authentication is required")
    scheme, token = credentials(header)
    caller = services.keys.authenticate(token) if scheme in ("key", "bearer") else None
    if caller is None:
        raise flat_error(401, "No user found for Key ID and Secret")
    context(request).key_name = caller.name
    return caller


def start_timeout(request: Request) -> str | None:
    """X-Fal-Request-Timeout, as sent (fal's serving layer checks it after the body)."""
    return request.headers.get("x-fal-request-timeout")


def queue_root(request: Request, services: Services) -> str:
    """Where the caller reaches the queue, for the URLs in status objects (docs/api.md §2.5.1)."""
    if services.config.fal.queue_base_url:
        return services.config.fal.queue_base_url.rstrip("/") + "/"
    via = request.state.fal.via
    if via == "proxy":
        return "https://queue.fal.run/"  # the JS client ignores these URLs and rebuilds fal's own
    public = services.config.http.public_base_url  # behind the production proxy: the https URL clients use
    if public:
        return public.rstrip("/") + "/queue/"
    base = str(request.base_url)
    return base if via == "host" else f"{base}queue/"


def with_logs(request: Request) -> bool:
    return request.query_params.get("logs", "").lower() in ("1", "true")


@router.post(f"/{APP_ID}", dependencies=[Depends(operation("run"))])
async def run_or_submit(
    request: Request, caller: Caller = Depends(fal_caller), services: Services = Depends(get_services),
    body: bytes = Depends(request_body),
) -> Response:
    ctx = context(request)
    if request.state.fal.queue:
        ctx.operation = "submit"  # one path, two operations (docs/api.md §1.2)
        return await serving.submit(
            services, ctx, caller, body, start_timeout=start_timeout(request),
            webhook=request.query_params.get("fal_webhook"), queue_root=queue_root(request, services))
    inp = serving.parse(body)  # before the limits: a malformed body costs no quota
    return await serving.run(services, ctx, caller, inp, serving.seconds_to_start(start_timeout(request)))


@router.post(f"/{APP_ID}/stream", dependencies=[Depends(operation("stream"))])
async def stream(
    request: Request, caller: Caller = Depends(fal_caller), services: Services = Depends(get_services),
    body: bytes = Depends(request_body),
) -> Response:
    inp = serving.parse(body)
    timeout_s = serving.seconds_to_start(start_timeout(request))
    return await serving.stream(services, context(request), caller, inp, timeout_s)


@router.get(f"{REQUEST}/status", dependencies=[Depends(operation("status"))])
async def status(
    request_id: str, request: Request, caller: Caller = Depends(fal_caller), services: Services = Depends(get_services)
) -> Response:
    return await serving.status(services, context(request), caller, request_id,
                                queue_root=queue_root(request, services), with_logs=with_logs(request))


@router.get(f"{REQUEST}/status/stream", dependencies=[Depends(operation("status_stream"))])
async def status_stream(
    request_id: str, request: Request, caller: Caller = Depends(fal_caller), services: Services = Depends(get_services)
) -> Response:
    return await serving.status_stream(services, context(request), caller, request_id,
                                       queue_root=queue_root(request, services), with_logs=with_logs(request))


@router.get(REQUEST, dependencies=[Depends(operation("result"))])
async def result(
    request_id: str, request: Request, caller: Caller = Depends(fal_caller), services: Services = Depends(get_services)
) -> Response:
    return await serving.result(services, context(request), caller, request_id)


@router.put(f"{REQUEST}/cancel", dependencies=[Depends(operation("cancel"))])
async def cancel(
    request_id: str, request: Request, caller: Caller = Depends(fal_caller), services: Services = Depends(get_services)
) -> Response:
    return await serving.cancel(services, context(request), caller, request_id)
