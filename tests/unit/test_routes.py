"""Routes stay thin and label themselves: each reads its request and calls its API's serving layer,
which alone owns admission, slots and the engine stream; each names its API and operation explicitly, so
metric labels never follow a function's name (docs/architecture.md, "Where each concern lives")."""

from __future__ import annotations

import inspect
import logging

import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from serve.api.context import RequestContextMiddleware, api_name, operation
from serve.api.eachlabs import routes as eachlabs_routes
from serve.api.fal import routes as fal_routes
from serve.api.openai import routes as openai_routes
from serve.ingress import create_app
from tests.fakes import FakeEngine, make_services

ROUTERS = {"fal": fal_routes, "eachlabs": eachlabs_routes, "openai": openai_routes}
# What only the serving layer may touch: limits and slots, the store, the engine and its stream.
SERVING_ONLY = ("admitted", "generation(", "services.store", "services.engine", "EventStream", "enqueue(")


def _routes(module) -> list[APIRoute]:
    return [r for r in module.router.routes if isinstance(r, APIRoute)]


def _dependency_names(route: APIRoute) -> list[str]:
    return [dep.call.__name__ for dep in route.dependant.dependencies if dep.call is not None]


@pytest.mark.parametrize("api", ROUTERS)
def test_every_route_names_its_api_and_operation(api):
    for route in _routes(ROUTERS[api]):
        names = _dependency_names(route)
        assert names.count("name_api") == 1 and names.count("name_operation") == 1, (route.path, names)


@pytest.mark.parametrize("api", ROUTERS)
def test_route_handlers_are_thin(api):
    module = ROUTERS[api]
    for route in _routes(module):
        lines, _ = inspect.getsourcelines(route.endpoint)
        assert len(lines) <= 25, f"{route.endpoint.__name__} is {len(lines)} lines"
    source = inspect.getsource(module)
    assert not [word for word in SERVING_ONLY if word in source]


def test_labels_come_from_the_context_not_from_function_names(caplog):
    router = APIRouter(dependencies=[Depends(api_name("fal"))])

    @router.get("/x", dependencies=[Depends(operation("the_label"))])
    async def some_function_name() -> dict:
        return {}

    app = FastAPI()
    app.include_router(router)
    app.add_middleware(RequestContextMiddleware)
    caplog.set_level(logging.INFO, logger="llava_serve.access")
    TestClient(app).get("/x")
    (line,) = [r.fields for r in caplog.records if r.name == "llava_serve.access"]
    assert (line["api"], line["route"], line["status"]) == ("fal", "the_label", 200)


def test_an_unauthenticated_request_is_still_labelled(caplog):
    caplog.set_level(logging.INFO, logger="llava_serve.access")
    client = TestClient(create_app(make_services(FakeEngine())))
    assert client.get("/fal-ai/llavav15-13b/requests/abc/status").status_code == 401
    assert client.get("/v1/prediction/abc").status_code == 401
    lines = [r.fields for r in caplog.records if r.name == "llava_serve.access"]
    assert [(line["api"], line["route"]) for line in lines] == [("fal", "status"), ("eachlabs", "get")]
