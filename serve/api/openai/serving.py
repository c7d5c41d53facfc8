"""OpenAI's serving layer (docs/api.md §8): chat completions, JSON or SSE, and the model list.

Routes (routes.py) read the request and call these; the shared core (serve/api/serving.py) owns limits
and the engine stream's lifetime, so one key's budget is the same across fal, Eachlabs and this API.
What is OpenAI's here is only its shapes.
"""

from __future__ import annotations

import time
from typing import AsyncGenerator, AsyncIterator

from fastapi import Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serve.api.body import parse_json
from serve.api.errors import ApiError, answer
from serve.api.limits import rate_limit_headers
from serve.api.openai.errors import ANSWERS, invalid_request, model_not_found
from serve.api.openai.protocol import (
    Answer,
    ChatRequest,
    Conversation,
    check,
    conversation,
    model_card,
    to_generation_request,
)
from serve.api.serving import BuildRequest, Generation, complete, generation, open_generation, streamed
from serve.api.services import Services
from serve.api.sse import EventStream, event
from serve.auth import Caller
from serve.engine.types import StreamItem, TextDelta
from serve.telemetry.access import RequestContext

DONE = b"data: [DONE]\n\n"


def parse(services: Services, body: bytes) -> tuple[ChatRequest, Conversation]:
    """The request, checked before it costs any quota: schema, model, what LLaVA-1.5 can do."""
    try:
        req = ChatRequest.model_validate(parse_json(body))
    except ValidationError as exc:
        raise invalid_request(exc) from None
    _served(services, req.model)
    check(req, services.config.engine.max_model_len)
    return req, conversation(req)


def _served(services: Services, model_id: str) -> None:
    if model_id != services.config.model.served_name:
        raise model_not_found(model_id)


def _build(req: ChatRequest, conv: Conversation, ctx: RequestContext, caller: Caller) -> BuildRequest:
    return lambda image: to_generation_request(req, conv, request_id=ctx.request_id, owner=caller.name, image=image)


def _headers(gen: Generation, ctx: RequestContext) -> dict[str, str]:
    """The limit headers of the admission, and the request id the SDKs report (`x-request-id`)."""
    return {**rate_limit_headers(gen.admission), "x-request-id": ctx.request_id}


def _failed(exc: BaseException, conv: Conversation) -> ApiError:
    return answer(ANSWERS, exc, {"image_param": conv.image_param})


def _answer(services: Services, ctx: RequestContext) -> Answer:
    return Answer(id=f"chatcmpl-{ctx.request_id}", created=int(time.time()), model=services.config.model.served_name)


async def chat(
    services: Services, ctx: RequestContext, caller: Caller, req: ChatRequest, conv: Conversation
) -> Response:
    if req.stream:
        return await _stream(services, ctx, caller, req, conv)
    try:
        async with generation(services, ctx, caller, conv.image_url, _build(req, conv, ctx, caller),
                              stream=False) as gen:
            chunks, done = await complete(gen, ctx, caller)
    except Exception as exc:
        raise _failed(exc, conv) from None
    body = _answer(services, ctx).completion("".join(chunks), done)
    return JSONResponse(body, headers=_headers(gen, ctx))


async def _stream(services: Services, ctx: RequestContext, caller: Caller, req: ChatRequest,
                  conv: Conversation) -> Response:
    """SSE of chat.completion.chunk (docs/api.md §8.5). Everything that can fail before the first token
    answers as a normal JSON error; the concurrency slot is held until the stream ends."""
    ctx.operation = "chat_stream"  # one path, two operations
    try:
        gen, end = await open_generation(services, ctx, caller, conv.image_url, _build(req, conv, ctx, caller),
                                         stream=True)
    except Exception as exc:
        raise _failed(exc, conv) from None
    with_usage = req.stream_options is not None and req.stream_options.include_usage
    events = _chunks(streamed(gen, ctx, caller), _answer(services, ctx), with_usage, conv)
    return EventStream(events, headers=_headers(gen, ctx), cleanup=end)


async def _chunks(
    items: AsyncIterator[StreamItem], ans: Answer, with_usage: bool, conv: Conversation
) -> AsyncGenerator[bytes, None]:
    yield event(ans.chunk({"role": "assistant", "content": ""}, with_usage=with_usage))
    try:
        async for item in items:
            if isinstance(item, TextDelta):
                if item.text:
                    yield event(ans.chunk({"content": item.text}, with_usage=with_usage))
                continue
            yield event(ans.chunk({}, item.finish_reason, with_usage=with_usage))
            if with_usage:
                yield event(ans.usage_chunk(item))
            yield DONE
    except Exception as exc:
        # Mid-stream failure (docs/api.md §8.5): an error event the SDKs raise, then the end of the stream.
        yield event(_failed(exc, conv).body)
        yield DONE


def models(services: Services) -> Response:
    return JSONResponse({"object": "list", "data": [_card(services)]})


def model(services: Services, model_id: str) -> Response:
    _served(services, model_id)
    return JSONResponse(_card(services))


def _card(services: Services) -> dict:
    return model_card(services.config.model.served_name, services.started)
