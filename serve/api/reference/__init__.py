"""The API reference (docs/api.md §9): `GET /openapi.json`, the OpenAPI document of the three APIs
(openapi.py), and `GET /docs`, Swagger UI over it, whose script, stylesheet and icon this server serves
itself from the package (static/README.md): no CDN, so the page works on a cluster without outside access.

No key is needed to read either. `http.reference: false` leaves them out (both 404).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.staticfiles import StaticFiles

from serve.api.context import operation
from serve.api.reference.openapi import document
from serve.config import ServeConfig

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
STATIC_URL = "/docs/static"
STATIC = Path(__file__).with_name("static")
# What the page loads, and its type (Python's mimetypes guesses .js differently across versions).
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
# Swagger UI's own settings: no call to its online validator (validator.swagger.io), no key kept in the
# browser's storage after the tab closes.
SWAGGER_UI = {"validatorUrl": None, "persistAuthorization": False, "displayRequestDuration": True}

# Not an API's: no api_name (not counted as API traffic), but labelled in the access log and metrics.
router = APIRouter(include_in_schema=False, dependencies=[Depends(operation("reference"))])
_files = StaticFiles(directory=STATIC, check_dir=False)


def mount(app: FastAPI, config: ServeConfig) -> None:
    """Serve the reference on `app`, unless the config turns it off."""
    if not config.http.reference:
        return

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, config)
        return app.openapi_schema

    app.openapi = openapi  # FastAPI's hook: built once, on first use
    app.include_router(router)


def _root(request: Request) -> str:
    """The prefix a proxy mounted the app under (ASGI root_path), for the URLs the page loads."""
    return request.scope.get("root_path", "").rstrip("/")


@router.get(OPENAPI_URL)
async def openapi_json(request: Request) -> JSONResponse:
    doc = request.app.openapi()
    if root := _root(request):
        doc = {**doc, "servers": [{"url": root}]}
    return JSONResponse(doc)


@router.get(DOCS_URL)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=root + OPENAPI_URL, title="llava-serve API reference",
        swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js", swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{STATIC_URL}/favicon-32x32.png", swagger_ui_parameters=SWAGGER_UI,
    )


@router.get(STATIC_URL + "/{name}")
async def asset(name: str, request: Request) -> Response:
    if name not in ASSETS:
        raise HTTPException(404)
    response = await _files.get_response(name, request.scope)  # with ETag and Last-Modified: 304s
    if response.status_code == 200:
        response.headers["content-type"] = ASSETS[name]
    return response
