"""The API reference (docs/api.md §9): /openapi.json describes every public route of the three APIs, with
the request bodies the routes parse themselves; /docs is Swagger UI loading only this server's bundled
assets (no CDN); `http.reference: false` turns both off. Real app, fake engine, no Ray."""

from __future__ import annotations

import json
import logging
import re
import tomllib
from fnmatch import fnmatch

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from serve.api import reference
from serve.api.reference import openapi
from serve.ingress import create_app
from tests.conftest import LOCAL_KEY, ROOT
from tests.fakes import FakeEngine, make_services

APP = "/fal-ai/llavav15-13b"
MAIN_PATHS = [
    (APP, "post"), (f"{APP}/stream", "post"), (f"/queue{APP}", "post"),
    (f"/queue{APP}/requests/{{request_id}}/status", "get"), (f"/queue{APP}/requests/{{request_id}}", "get"),
    (f"/queue{APP}/requests/{{request_id}}/cancel", "put"), (f"{APP}/requests/{{request_id}}/status", "get"),
    ("/v1/prediction", "post"), ("/v1/prediction/run", "post"), ("/v1/prediction/{prediction_id}", "get"),
    ("/v1/prediction/{prediction_id}/cancel", "post"),
    ("/v1/chat/completions", "post"), ("/v1/models", "get"), ("/v1/models/{model_id}", "get"),
    ("/healthz", "get"), ("/readyz", "get"),
]


@pytest.fixture(scope="module")
def app():
    return create_app(make_services(FakeEngine()))


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


@pytest.fixture(scope="module")
def doc(client):
    resp = client.get("/openapi.json")  # no key
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    return json.loads(resp.text)


def operations(doc):
    return [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]


def resolve(doc, ref: str) -> dict:
    assert ref.startswith("#/components/schemas/"), ref
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]


def body_schema(doc, path: str, method: str = "post") -> dict:
    body = doc["paths"][path][method]["requestBody"]
    assert body["required"] is True
    return resolve(doc, body["content"]["application/json"]["schema"]["$ref"])


def test_the_document_is_openapi_3_and_lists_each_apis_paths(doc):
    assert re.fullmatch(r"3\.\d+\.\d+", doc["openapi"])
    assert doc["info"]["title"] == "llava-serve" and doc["info"]["version"]
    missing = [(path, method) for path, method in MAIN_PATHS if method not in doc["paths"].get(path, {})]
    assert not missing, missing
    tags = {path: op["tags"] for path, _, op in operations(doc)}
    assert tags[APP] == tags[f"/queue{APP}"] == ["fal"]
    assert tags["/v1/prediction"] == ["eachlabs"] and tags["/v1/chat/completions"] == ["openai"]
    assert tags["/healthz"] == ["operations"]
    assert {t["name"] for t in doc["tags"]} == {"fal", "eachlabs", "openai", "operations"}
    # Left out: the Eachlabs catch-all, trailing-slash aliases, the proxy, and the reference itself.
    assert not [p for p in doc["paths"] if p.endswith("/") or "{rest}" in p or p.startswith(("/api/", "/docs"))]
    assert "/openapi.json" not in doc["paths"]


def test_every_public_route_is_documented_and_every_label_applies(app, doc):
    for route in app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema and route.path_format != "/v1/{rest}":
            path = route.path_format.rstrip("/") or "/"
            assert {m.lower() for m in route.methods} <= set(doc["paths"][path]), route.path_format
    ids = [op["operationId"] for _, _, op in operations(doc)]
    assert len(ids) == len(set(ids))
    assert {op for op, _, _ in [*openapi.OPERATIONS.values(), *openapi.QUEUED.values()]} <= set(ids)
    assert {"fal_run", "fal_submit", "eachlabs_create", "openai_chat"} <= set(ids)


def test_request_bodies_come_from_the_apis_models(doc):
    for path in (APP, f"/queue{APP}", f"{APP}/stream"):
        fal = body_schema(doc, path)
        assert fal["title"] == "FalInput" and set(fal["required"]) == {"prompt", "image_url"}
        assert fal["properties"]["max_new_tokens"]["anyOf"][0]["maximum"] == 2048
    for path in ("/v1/prediction", "/v1/prediction/run"):
        create = body_schema(doc, path)
        assert set(create["required"]) == {"model", "input"}
        assert create["properties"]["model"]["enum"] == ["llava-13b"]
        llava = resolve(doc, create["properties"]["input"]["$ref"])
        assert llava["title"] == "LlavaInput" and set(llava["required"]) == {"image", "prompt"}
    chat = body_schema(doc, "/v1/chat/completions")
    assert chat["title"] == "ChatRequest" and set(chat["required"]) == {"model", "messages"}
    assert "stream_options" in chat["properties"]
    assert "requestBody" not in doc["paths"]["/v1/models"]["get"]
    run = doc["paths"][APP]["post"]
    assert "X-Fal-Request-Timeout" in [p["name"] for p in run["parameters"]]
    assert "fal_webhook" in [p["name"] for p in doc["paths"][f"/queue{APP}"]["post"]["parameters"]]


def test_every_reference_resolves_and_fastapis_422_is_gone(doc):
    refs = re.findall(r'"\$ref": "([^"]+)"', json.dumps(doc))
    assert refs
    for ref in refs:
        resolve(doc, ref)
    assert "HTTPValidationError" not in json.dumps(doc)
    assert not [(p, m) for p, m, op in operations(doc) if "422" in op["responses"]]


def test_security_schemes_match_each_apis_auth(doc):
    schemes = doc["components"]["securitySchemes"]
    assert schemes["falKey"] == {**schemes["falKey"], "type": "apiKey", "in": "header", "name": "Authorization"}
    assert schemes["eachlabsKey"] == {**schemes["eachlabsKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    expected = {"fal": {"falKey", "bearer"}, "eachlabs": {"eachlabsKey", "bearer"}, "openai": {"bearer"}}
    for path, method, op in operations(doc):
        (tag,) = op["tags"]
        names = {name for req in op.get("security", []) for name in req}
        assert names == expected.get(tag, set()), (method, path)
        if tag in expected:
            assert "$ref" in op["responses"]["default"]["content"]["application/json"]["schema"]


def _example(doc, path):
    return doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]


def test_the_examples_are_accepted_by_the_routes(client, doc):
    fal = client.post(APP, json=_example(doc, APP), headers={"Authorization": f"Key {LOCAL_KEY}"})
    assert fal.status_code == 200, fal.text
    each = client.post("/v1/prediction", json=_example(doc, "/v1/prediction"), headers={"X-API-Key": LOCAL_KEY})
    assert each.status_code == 200, each.text
    chat = client.post("/v1/chat/completions", json=_example(doc, "/v1/chat/completions"),
                       headers={"Authorization": f"Bearer {LOCAL_KEY}"})
    assert chat.status_code == 200, chat.text


def test_bad_bodies_keep_their_apis_errors(client):
    fal = client.post(APP, content=b"{}", headers={"Authorization": f"Key {LOCAL_KEY}"})
    assert fal.status_code == 422 and fal.json()["detail"][0]["loc"][0] == "body"
    each = client.post("/v1/prediction", content=b"[]", headers={"X-API-Key": LOCAL_KEY})
    assert each.status_code == 400 and each.json() == {"error": "Invalid request body"}
    chat = client.post("/v1/chat/completions", content=b"{", headers={"Authorization": f"Bearer {LOCAL_KEY}"})
    assert chat.status_code == 400 and chat.json()["error"]["type"] == "invalid_request_error"


def test_docs_load_only_this_servers_assets(client):
    resp = client.get("/docs")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert "http://" not in html and "https://" not in html  # no CDN
    assert "SwaggerUIBundle" in html and "url: '/openapi.json'" in html
    (js,) = re.findall(r'<script src="([^"]+)"', html)
    (css,) = re.findall(r'<link type="text/css" rel="stylesheet" href="([^"]+)"', html)
    (icon,) = re.findall(r'<link rel="shortcut icon" href="([^"]+)"', html)
    assets = {"js": js, "css": css, "icon": icon}
    types = {"js": "text/javascript", "css": "text/css", "icon": "image/png"}
    for kind, url in assets.items():
        assert url.startswith("/docs/static/"), url
        got = client.get(url)
        assert got.status_code == 200, url
        assert got.headers["content-type"].split(";")[0] == types[kind]
        assert got.content == (reference.STATIC / url.rsplit("/", 1)[1]).read_bytes()
        again = client.get(url, headers={"If-None-Match": got.headers["etag"]})
        assert again.status_code == 304 and not again.content
    assert client.get("/docs/static/README.md").status_code == 404  # only the page's assets
    assert client.get("/docs/static/LICENSE").status_code == 404


def test_behind_a_path_prefix_the_page_and_document_use_it(app):
    client = TestClient(app, root_path="/llava")
    html = client.get("/docs").text
    assert 'src="/llava/docs/static/swagger-ui-bundle.js"' in html and "url: '/llava/openapi.json'" in html
    assert client.get("/openapi.json").json()["servers"] == [{"url": "/llava"}]


def test_reference_requests_are_labelled_not_counted_as_an_api(client, caplog):
    caplog.set_level(logging.INFO, logger="llava_serve.access")
    client.get("/docs")
    (line,) = [r.fields for r in caplog.records if r.name == "llava_serve.access"]
    assert (line["api"], line["route"], line["status"], line["key"]) == ("other", "reference", 200, None)


def test_the_switch_turns_the_reference_off():
    services = make_services(FakeEngine())
    cfg = services.config
    services.config = cfg.model_copy(update={"http": cfg.http.model_copy(update={"reference": False})})
    client = TestClient(create_app(services))
    for path in ("/docs", "/openapi.json", "/docs/static/swagger-ui.css", "/docs/static/swagger-ui-bundle.js"):
        assert client.get(path).status_code == 404, path
    assert client.get("/redoc").status_code == 404
    assert client.get("/healthz").status_code == 200


def test_the_vendored_assets_are_packaged_and_their_version_documented():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = package_data["serve.api.reference"]
    for name in [*reference.ASSETS, "LICENSE", "NOTICE", "README.md"]:
        assert (reference.STATIC / name).is_file(), name
        assert any(fnmatch(f"static/{name}", g) for g in globs), name
    readme = (reference.STATIC / "README.md").read_text()
    bundle = (reference.STATIC / "swagger-ui-bundle.js").read_text()
    (version,) = set(re.findall(r'PACKAGE_VERSION:"(5\.\d+\.\d+)"', bundle))
    assert f"| Version | {version} |" in readme and "Apache-2.0" in readme
    assert "Apache License" in (reference.STATIC / "LICENSE").read_text()
