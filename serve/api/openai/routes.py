"""OpenAI routes (docs/api.md §8): read the request, call the serving layer (serving.py), return."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from serve.api.body import request_body
from serve.api.context import api_name, context, operation
from serve.api.errors import shaped_errors
from serve.api.openai import serving
from serve.api.openai.errors import ANSWERS, error
from serve.api.paths import ANY_PATH
from serve.api.services import Services, get_services
from serve.auth import Caller, credentials

# What OpenAI's SDKs send besides the usual headers (a browser preflight must admit them, docs/api.md §1.4).
SDK_HEADERS = ("openai-organization", "openai-project", "x-stainless-arch", "x-stainless-custom-poll-interval",
               "x-stainless-helper-method", "x-stainless-lang", "x-stainless-os", "x-stainless-package-version",
               "x-stainless-poll-helper", "x-stainless-retry-count", "x-stainless-runtime",
               "x-stainless-runtime-version", "x-stainless-timeout")

# Every failure in OpenAI's shape (docs/api.md §8.6); every route is the OpenAI API's.
router = APIRouter(route_class=shaped_errors(ANSWERS), dependencies=[Depends(api_name("openai"))])


async def openai_caller(request: Request, services: Services = Depends(get_services)) -> Caller:
    scheme, token = credentials(request.headers.get("authorization", ""))
    caller = services.keys.authenticate(token) if scheme == "bearer" and token else None
    if caller is None:  # never the key presented: it may be a real one, mistyped
        raise error(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                    "invalid_request_error", None, "invalid_api_key")
    context(request).key_name = caller.name
    return caller


@router.post("/v1/chat/completions", dependencies=[Depends(operation("chat"))])
async def chat(
    request: Request, caller: Caller = Depends(openai_caller), services: Services = Depends(get_services),
    body: bytes = Depends(request_body),
) -> Response:
    req, conv = serving.parse(services, body)  # before the limits: a bad body costs no quota
    return await serving.chat(services, context(request), caller, req, conv)


@router.get("/v1/models", dependencies=[Depends(operation("models")), Depends(openai_caller)])
async def models(services: Services = Depends(get_services)) -> Response:
    return serving.models(services)


@router.get(f"/v1/models/{{model_id:{ANY_PATH}}}",
            dependencies=[Depends(operation("model")), Depends(openai_caller)])
async def model(model_id: str, services: Services = Depends(get_services)) -> Response:
    return serving.model(services, model_id)
