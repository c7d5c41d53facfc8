"""The one way a route reads its request body: bounded by http.max_body_bytes (docs/api.md §1.4).

A body over the cap is refused from its Content-Length before any of it is read, or, without one, as soon as
what arrived passes the cap: it is never buffered whole. The refusal is `BodyTooLarge`, which each API
answers 413 in its own shape (its ANSWERS table). A dependency placed after the key's, so a caller without a
key is answered 401 without its body being read.
"""

from __future__ import annotations

from fastapi import Depends, Request

from serve.api.services import Services, get_services
from serve.jobs.models import BodyTooLarge


async def request_body(request: Request, services: Services = Depends(get_services)) -> bytes:
    limit = services.config.http.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)
