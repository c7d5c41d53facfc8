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
from serve.net.bounded import read_bounded


async def request_body(request: Request, services: Services = Depends(get_services)) -> bytes:
    limit = services.config.http.max_body_bytes
    return await read_bounded(request.stream(), limit, request.headers.get("content-length", ""),
                              lambda: BodyTooLarge(limit))
