"""The OpenAPI document of the three APIs (docs/api.md §9): FastAPI's, generated from the routes, then
completed with what the routes cannot tell FastAPI.

The routes read their raw bodies (each API answers bad input in its own shape: FastAPI never validates
one), so the request bodies are declared here from the APIs' pydantic models, with the headers and query
parameters the routes read themselves, each API's authentication (§1.3) and error shape, and the fal
queue's `/queue/...` spellings, which `serve/api/fal/dispatch.py` rewrites before routing. Nothing here
changes how a request is parsed or answered: this only describes it.
"""

from __future__ import annotations

import copy
from importlib import metadata
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from serve.api.eachlabs.protocol import MODEL as EACHLABS_MODEL
from serve.api.eachlabs.protocol import CreatePrediction, LlavaInput
from serve.api.eachlabs.routes import router as eachlabs_router
from serve.api.fal.dispatch import QUEUE_PREFIX
from serve.api.fal.protocol import APP_ID, FalInput, FalOutput
from serve.api.fal.routes import REQUEST
from serve.api.fal.routes import router as fal_router
from serve.api.openai.protocol import ChatRequest
from serve.api.openai.routes import router as openai_router
from serve.config import ServeConfig

APP = f"/{APP_ID}"
QUEUE = QUEUE_PREFIX.rstrip("/")
ROUTERS = {"fal": fal_router, "eachlabs": eachlabs_router, "openai": openai_router}
HIDDEN = {"/v1/{rest}"}  # Eachlabs' catch-all 404 for the rest of /v1/: not an operation
REF = "#/components/schemas/{model}"

DESCRIPTION = """\
LLaVA-1.5 behind three APIs, on one origin and one set of keys (any key of the keys file works for every
API). The wire contract, with every rule and error, is `docs/api.md` in the repository; each operation
names its section.

- **fal** (`fal-ai/llavav15-13b`): run and stream at `/fal-ai/...`, the queue at `/queue/fal-ai/...`.
  Not listed: the JS client's proxy mode (`/api/fal/proxy`, or any path with `x-fal-target-url`, §2.8)
  and the queue reached by a `Host` starting with `queue.` (the same paths without `/queue`, §1.2).
- **Eachlabs** (`llava-13b` predictions) at `/v1/prediction...`; each route also answers with a trailing `/`.
- **OpenAI** chat completions at `/v1/chat/completions` and `/v1/models`.

Authorize with the scheme of the API you try: `Key <key>` for fal, the key alone for Eachlabs'
`X-API-Key`, the key alone for Bearer.
"""

TAGS = [
    {"name": "fal", "description": "fal's `fal-ai/llavav15-13b`: run, stream and the queue (docs/api.md §2). "
     "`Authorization: Key <key>` (or `Bearer <key>`)."},
    {"name": "eachlabs", "description": "Eachlabs' `llava-13b` predictions (docs/api.md §3). `X-API-Key: <key>` "
     "(or `Authorization: Bearer <key>`)."},
    {"name": "openai", "description": "OpenAI chat completions (docs/api.md §8). `Authorization: Bearer <key>`."},
    {"name": "operations", "description": "Liveness, readiness and metrics (docs/api.md §1.1); no key."},
]

SECURITY_SCHEMES = {
    "falKey": {"type": "apiKey", "in": "header", "name": "Authorization",
               "description": "fal: the whole header value, `Key <key>`."},
    "eachlabsKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "Eachlabs: the key."},
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "`Authorization: Bearer <key>`: OpenAI's scheme, also accepted by fal and Eachlabs."},
}
SECURITY = {
    "fal": [{"falKey": []}, {"bearer": []}],
    "eachlabs": [{"eachlabsKey": []}, {"bearer": []}],
    "openai": [{"bearer": []}],
}

# Each API's error body (docs/api.md §2.7, §3.2, §8.6), as its `default` response.
ERRORS = {
    "fal": ("FalError", "An error in fal's shape (§2.7): `detail` is a message, or a list of field errors "
            "(422).", {
                "type": "object", "required": ["detail"],
                "properties": {"detail": {"anyOf": [{"type": "string"}, {"type": "array", "items": {
                    "type": "object", "properties": {"loc": {"type": "array", "items": {}}, "msg": {"type": "string"},
                                                     "type": {"type": "string"}, "input": {}}}}]},
                               "error_type": {"type": "string"}}}),
    "eachlabs": ("EachlabsError", "An error in Eachlabs' shape (§3.2).", {
        "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}),
    "openai": ("OpenAIError", "An error in OpenAI's shape (§8.6).", {
        "type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}),
}

# (method, path) -> (operationId, summary, docs/api.md section)
OPERATIONS = {
    ("get", "/healthz"): ("healthz", "Liveness", "§1.1"),
    ("get", "/readyz"): ("readyz", "Readiness: the engine answers its health check, else 503", "§1.1"),
    ("get", "/metrics"): ("metrics", "Prometheus metrics (text; 503 where Ray is not running)", "§1.1"),
    ("post", APP): ("fal_run", "Run: generate and answer with the output", "§2.3"),
    ("post", f"{APP}/stream"): ("fal_stream", "Stream: the output as server-sent events", "§2.4"),
    ("get", f"{REQUEST}/status"): ("fal_status", "Status of a queued request (202 until COMPLETED)", "§2.5.2"),
    ("get", f"{REQUEST}/status/stream"): ("fal_status_stream", "Status as server-sent events until COMPLETED",
                                          "§2.5.3"),
    ("get", REQUEST): ("fal_result", "Result of a queued request", "§2.5.4"),
    ("put", f"{REQUEST}/cancel"): ("fal_cancel", "Cancel a queued request", "§2.5.5"),
    ("post", "/v1/prediction"): ("eachlabs_create", "Create a prediction", "§3.2"),
    ("post", "/v1/prediction/run"): ("eachlabs_run", "Run a prediction: answer when it has ended", "§3.5"),
    ("get", "/v1/prediction/{prediction_id}"): ("eachlabs_get", "Get a prediction", "§3.3"),
    ("post", "/v1/prediction/{prediction_id}/cancel"): ("eachlabs_cancel", "Cancel a prediction", "§3.4"),
    ("post", "/v1/chat/completions"): ("openai_chat", "Create a chat completion (JSON, or SSE with `stream`)",
                                       "§8"),
    ("get", "/v1/models"): ("openai_models", "List the served model", "§8.1"),
    ("get", "/v1/models/{model_id}"): ("openai_model", "Look up a model", "§8.1"),
}
# The queue's spellings: the same routes behind /queue, where a POST to the app submits (dispatch.py).
QUEUED = {
    ("post", APP): ("fal_submit", "Submit to the queue", "§2.5.1"),
    **{key: (f"{op}_queue", summary, section) for key, (op, summary, section) in OPERATIONS.items()
       if key[1].startswith(REQUEST)},
}

# A 16x16 PNG, so that "Try it out" works on a server without outside access: put your image's URL.
EXAMPLE_IMAGE = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGklEQVR42mM8IWfDQApgYiARj"
                 "GoY1TB0NAAAqqUBQv8EtBYAAAAASUVORK5CYII=")
PROMPT = "What is in this picture?"

TIMEOUT = {"name": "X-Fal-Request-Timeout", "in": "header", "required": False,
           "schema": {"type": "number", "exclusiveMinimum": 1},
           "description": "Seconds the request may wait before generation starts (> 1); then 504 (§2.3, §2.5.1)."}
LOGS = {"name": "logs", "in": "query", "required": False, "schema": {"type": "string", "examples": ["1", "true"]},
        "description": "Include the job's log lines: `1` or `true` (any case); anything else is false."}
WEBHOOK = {"name": "fal_webhook", "in": "query", "required": False, "schema": {"type": "string", "format": "uri"},
           "description": "An http(s) URL the result is POSTed to when the request ends (§2.10)."}
PARAMETERS = {
    ("post", APP): [TIMEOUT],
    ("post", f"{APP}/stream"): [TIMEOUT],
    ("post", QUEUE + APP): [TIMEOUT, WEBHOOK],
    **{("get", prefix + REQUEST + end): [LOGS] for prefix in ("", QUEUE) for end in ("/status", "/status/stream")},
}

SSE = {"text/event-stream": {"schema": {"type": "string"}}}
OUTPUT = {"application/json": {"schema": {"$ref": REF.format(model="FalOutput")}}}
RESPONSES = {  # the success answers the routes' `-> Response` leaves FastAPI to guess
    ("get", "/metrics"): ("Prometheus text format", {"text/plain": {"schema": {"type": "string"}}}),
    ("post", APP): ("The output (§2.2)", OUTPUT),
    ("post", f"{APP}/stream"): ("Server-sent events: the output so far, then the final output (§2.4)", SSE),
    ("post", QUEUE + APP): ("The queued request: its id and status, result and cancel URLs (§2.5.1)", None),
    **{("get", prefix + REQUEST): ("The output (§2.2) of a succeeded request", OUTPUT) for prefix in ("", QUEUE)},
    **{("get", prefix + REQUEST + "/status/stream"): ("Server-sent events: status objects (§2.5.3)", SSE)
       for prefix in ("", QUEUE)},
    ("post", "/v1/chat/completions"): ("A chat completion, or with `stream` its chunks as server-sent events",
                                       {"application/json": {"schema": {"type": "object"}}, **SSE}),
}


def document(app: FastAPI, config: ServeConfig) -> dict[str, Any]:
    """The app's OpenAPI document (3.1)."""
    paths_served = {r.path_format for r in app.routes if isinstance(r, APIRoute)}
    routes = [r for r in app.routes if not (isinstance(r, APIRoute) and _hidden(r.path_format, paths_served))]
    doc = get_openapi(title="llava-serve", version=_version(app), description=DESCRIPTION, routes=routes, tags=TAGS)
    paths = doc["paths"]
    tags = {(m.lower(), r.path_format): tag for tag, router in ROUTERS.items()
            for r in router.routes if isinstance(r, APIRoute) for m in r.methods}
    for path, item in paths.items():
        for method, op in item.items():
            op["tags"] = [tags.get((method, path), "operations")]
            op["responses"].pop("422", None)  # FastAPI's for path parameters: plain strings, never refused
            _describe(op, OPERATIONS.get((method, path)))
    for (method, path), labels in QUEUED.items():
        if method in paths.get(path, {}):
            op = paths.setdefault(QUEUE + path, {})[method] = copy.deepcopy(paths[path][method])
            _describe(op, labels)

    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # only the 422s above used them
        schemas.pop(name, None)
    schemas.update(_model_schemas())
    bodies = _bodies(config.model.served_name)
    for path, item in paths.items():
        for method, op in item.items():
            key, (tag,) = (method, path), op["tags"]
            if key in bodies:
                op["requestBody"] = bodies[key]
            op["parameters"] = op.get("parameters", []) + PARAMETERS.get(key, [])
            if not op["parameters"]:
                del op["parameters"]
            if key in RESPONSES:
                text, content = RESPONSES[key]
                op["responses"]["200"] = {"description": text, **({"content": content} if content else {})}
            if tag in SECURITY:
                op["security"] = SECURITY[tag]
                name, text, schema = ERRORS[tag]
                schemas[name] = schema
                op["responses"]["default"] = {"description": text, "content": {
                    "application/json": {"schema": {"$ref": REF.format(model=name)}}}}
    doc["components"]["securitySchemes"] = SECURITY_SCHEMES
    return doc


def _hidden(path: str, served: set[str]) -> bool:
    """The catch-all, and the trailing-slash spelling of a route that is listed without it."""
    return path in HIDDEN or (path.endswith("/") and path.rstrip("/") in served)


def _version(app: FastAPI) -> str:
    try:
        return metadata.version("llava-serve")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return app.version


def _describe(op: dict[str, Any], labels: tuple[str, str, str] | None) -> None:
    if labels is not None:
        op["operationId"], op["summary"], section = labels
        op["description"] = f"docs/api.md {section}."


def _model_schemas() -> dict[str, Any]:
    """The APIs' pydantic models as components; Eachlabs' `input` is the model's input (§3.6), which
    the create route checks itself (serve/api/eachlabs/serving.py, parse_create)."""
    _, defs = models_json_schema(
        [(FalInput, "validation"), (FalOutput, "serialization"), (CreatePrediction, "validation"),
         (LlavaInput, "validation"), (ChatRequest, "validation")], ref_template=REF)
    schemas = defs["$defs"]
    create = schemas["CreatePrediction"]
    create["properties"]["model"] = {"type": "string", "enum": [EACHLABS_MODEL], "title": "Model"}
    create["properties"]["input"] = {"$ref": REF.format(model="LlavaInput")}
    create["required"] = ["model", "input"]
    return schemas


def _bodies(served_name: str) -> dict[tuple[str, str], dict[str, Any]]:
    def body(model: str, example: dict[str, Any]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {
            "schema": {"$ref": REF.format(model=model)}, "example": example}}}

    fal = body("FalInput", {"prompt": PROMPT, "image_url": EXAMPLE_IMAGE, "max_new_tokens": 64})
    each = body("CreatePrediction", {"model": EACHLABS_MODEL, "version": "0.0.1",
                                     "input": {"image": EXAMPLE_IMAGE, "prompt": PROMPT, "max_tokens": 64}})
    chat = body("ChatRequest", {"model": served_name, "max_completion_tokens": 64, "messages": [{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE}},
                                    {"type": "text", "text": PROMPT}]}]})
    return {
        ("post", APP): fal, ("post", f"{APP}/stream"): fal, ("post", QUEUE + APP): fal,
        ("post", "/v1/prediction"): each, ("post", "/v1/prediction/run"): each,
        ("post", "/v1/chat/completions"): chat,
    }
