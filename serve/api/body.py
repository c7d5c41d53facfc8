"""The one way a route reads its request body: bounded by http.max_body_bytes (docs/api.md §1.4), and the one
way it parses it as JSON (`parse_json`).

A body over the cap is refused from its Content-Length before any of it is read, or, without one, as soon as
what arrived passes the cap: it is never buffered whole. The refusal is `BodyTooLarge`, which each API
answers 413 in its own shape (its ANSWERS table). A dependency placed after the key's, so a caller without a
key is answered 401 without its body being read.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Depends, Request
from pydantic import TypeAdapter, ValidationError

from serve.api.services import Services, get_services
from serve.jobs.models import BodyTooLarge
from serve.net.bounded import read_bounded

# Deepest nesting of arrays and objects a body may have. The APIs' deepest field is 6 levels down (an OpenAI
# image part's url); the bound keeps everything that walks a body (validation, echoes, the store's JSON)
# far from any recursion limit (docs/api.md §1.4).
MAX_DEPTH = 64
# The largest integer a JSON number may be: past a double's range every store and client reads it as
# infinity (Redis' Lua cjson too), and then cannot write it back.
_MAX_INT_BITS = 1024
_JSON = TypeAdapter(Any)  # pydantic's parser (jiter): refuses lone surrogates, bad UTF-8, and past ~200 levels


async def request_body(request: Request, services: Services = Depends(get_services)) -> bytes:
    limit = services.config.http.max_body_bytes
    return await read_bounded(request.stream(), limit, request.headers.get("content-length", ""),
                              lambda: BodyTooLarge(limit))


def parse_json(body: bytes) -> Any:
    """A request body as JSON, strictly (RFC 8259, docs/api.md §1.4): UTF-8; no NaN, Infinity or number
    out of a double's range; no lone surrogate (`"\\ud800"`); at most MAX_DEPTH levels of nesting. What
    Python's `json` would accept beyond that could be stored, then neither answered nor read back. A refusal
    is a pydantic `json_invalid` error, which each API answers as its invalid JSON (fal 422, Eachlabs and
    OpenAI 400)."""
    try:
        value = _JSON.validate_json(body)
    except ValidationError as exc:
        raise _invalid(str(exc.errors()[0].get("ctx", {}).get("error", "not JSON"))) from None
    problem = _problem(value)
    if problem:
        raise _invalid(problem)
    return value


def _problem(value: Any) -> str | None:
    stack = [(value, 0)]  # iterative: the depth is what is being checked
    while stack:
        item, depth = stack.pop()
        if (isinstance(item, float) and not math.isfinite(item)) or (
                isinstance(item, int) and item.bit_length() > _MAX_INT_BITS):
            return "numbers must be finite (no NaN, Infinity or 1e999)"  # jiter reads NaN, 1e999 is inf
        if isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return None


def _invalid(why: str) -> ValidationError:
    # FastAPI's own json_invalid error echoes `{}` for the input (fal's apps are FastAPI), never the body.
    return ValidationError.from_exception_data(
        "body", [{"type": "json_invalid", "loc": (), "input": {}, "ctx": {"error": why}}])
