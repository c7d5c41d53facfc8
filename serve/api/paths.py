"""A path parameter that takes whatever the client sent (docs/api.md §1.2): Starlette's `path` convertor is `.*`,
which stops at a decoded `%0a`, so such a path fell past the API's routes to FastAPI's default 404."""

from __future__ import annotations

from starlette.convertors import PathConvertor, register_url_convertor

ANY_PATH = "any_path"  # as in "/v1/{rest:any_path}"


class _AnyPath(PathConvertor):
    regex = r"[\s\S]*"


register_url_convertor(ANY_PATH, _AnyPath())
