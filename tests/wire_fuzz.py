"""The wire fuzz's requests and its run, shared by the in-process fuzz (tests/unit/test_fuzz.py) and the live one
(tests/hostile/test_fuzz_live.py): requests built from the app's own OpenAPI document (GET /openapi.json,
docs/api.md §9), then made hostile — values of the wrong type, huge or deeply nested, odd strings, NaN and lone
surrogates spliced into the JSON text, odd path segments (%00, %0a, non-Latin-1), odd headers and hosts, the
proxy's target. Every answer must be clean and in its API's shape (tests/wire_checks.py), and every job accepted
must read back to a terminal state for its owner.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from typing import Any

import httpx
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from tests.conftest import data_uri
from tests.wire_checks import follow_job, problems, routed_api

APP = "/fal-ai/llavav15-13b"
IMAGE = data_uri(size=(8, 8))

ODD_STRINGS = ["", " ", "\x00", "\n\r", "\u202e", "\ufeff", "<image>", "USER: hi ASSISTANT:", "</s>", "\x1b[31m",
               "🙂", "ray::x", "../../etc/passwd", "%00", "{{7*7}}", "A" * 5000, "data:image/png;base64,!!"]
IMAGES = [IMAGE, "data:image/png;base64,aGVsbG8=", "data:,", "http://127.0.0.1:1/x.png", "http://10.0.0.1/x.png",
          "https://[::1]/x.png", "gopher://127.0.0.1/x", "file:///etc/passwd", "data:image/png;base64," + "A" * 3000]
WEBHOOKS = ["http://127.0.0.1:1/hook", "ftp://127.0.0.1/x", "not a url", "http://[::1", "https://10.0.0.1/h"]
# What is fetched or called back (images, webhooks) is only ever a data: URI or an address the SSRF guard refuses
# or cannot parse: nothing here waits on DNS or the network.
_IMAGE = st.sampled_from([IMAGE] * len(IMAGES) + IMAGES)  # half of them a real image: jobs that succeed
HINTS: dict[str, st.SearchStrategy] = {
    "image_url": _IMAGE, "image": _IMAGE, "url": _IMAGE,
    "webhook_url": st.sampled_from(WEBHOOKS), "fal_webhook": st.sampled_from(WEBHOOKS),
    "model": st.sampled_from(["tiny-llava", "tiny-llava", "tiny-llava", "llava-13b", ""]),  # OpenAI's served name
}
_TEXT = st.text(max_size=12) | st.sampled_from(ODD_STRINGS)
HOSTILE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 2**63, 1e308, -0.0, 0.5])
    | st.floats(allow_nan=False, allow_infinity=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=10,
)
# Raw JSON text spliced where a value goes: what json.dumps will not write, and more.
RAW_VALUES = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" + "0" * 400, '"\\ud800"', '"\\udfff x"',
              '"\\ud83d\\ude00"', '"\\u0000"', "[" * 70 + "]" * 70, "[" * 5000, '{"a":' * 100 + "1" + "}" * 100,
              "01", "1.", ".5", "+1", "tru", "'x'", '"\x01"', "\xff\xfe", '"' + "\\" * 3 + '"']
RAW_BODIES = [b"", b"null", b"[]", b"{}", b"{", b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"{}" * 3, b"[" * 100_000,
              b'{"a":1,"a":2}', b"\x00", '{"prompt":"é"}'.encode("latin-1"), "{}".encode("utf-16")]
BAD_SEGMENTS = ["%00", "abc%0a", "abc%0d%0aX-Evil:%201", "%E2%82%AC", "%ff", "%", "%zz", "..", "%2e%2e", "a%2Fb",
                "a" * 300, "%20", "%09", "\u00e9", "null", "00000000-0000-0000-0000-000000000000"]
PATH_TEMPLATES = ["/v1/{}", "/v1/prediction/{}/x", "/queue/{}", "/fal-ai/{}", f"{APP}/{{}}", "/{}", "/docs/static/{}",
                  "/v1/models/{}", f"/queue{APP}/requests/{{}}/status/", "/queue/v1/prediction/{}"]
PROBES = ("/metrics", "/readyz")
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def from_schema(doc: dict, schema: dict, name: str | None = None, depth: int = 0) -> st.SearchStrategy:
    """Values the schema describes (a few JSON Schema keywords: what the APIs' models use)."""
    schema = resolve(doc, schema)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if name in HINTS:
        return HINTS[name]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(doc, s, name, depth) for s in schema[key]])
    kind = schema.get("type")
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=16)
    if kind == "integer":
        high = schema.get("maximum", schema.get("exclusiveMaximum", 2**31) - 1)
        return st.integers(schema.get("minimum", -(2**31)), min(high, 4096))
    if kind == "number":
        low, high = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum", 1e6)
        return st.floats(low, high, exclude_min="exclusiveMinimum" in schema, allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(doc, schema.get("items", {}), None, depth + 1), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 3), 3))
    if kind == "object" and depth < 4:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: from_schema(doc, v, k, depth + 1) for k, v in props.items() if k in required},
            optional={k: from_schema(doc, v, k, depth + 1) for k, v in props.items() if k not in required})
    return HOSTILE


SENTINEL = "\u0000splice\u0000"


def mutated(draw, value: Any) -> bytes:
    """The body as JSON, made hostile in one of several ways (or left as the schema made it)."""
    how = draw(st.sampled_from(["as is"] * 4 + ["value", "drop", "extra", "raw", "raw", "body"]))
    if how == "body":
        return draw(st.sampled_from(RAW_BODIES) | HOSTILE.map(lambda v: json.dumps(v).encode()))
    if isinstance(value, dict) and how != "as is":
        target, keys = value, list(value)
        while keys and draw(st.booleans()):  # sometimes one level down
            key = draw(st.sampled_from(keys))
            if not isinstance(target[key], dict) or not target[key]:
                break
            target = target[key]
            keys = list(target)
        key = draw(st.sampled_from(keys)) if keys and how != "extra" else draw(_TEXT)
        if how == "drop":
            target.pop(key, None)
        elif how == "value" or how == "extra":
            target[key] = draw(HOSTILE)
        else:
            target[key] = SENTINEL
            text = json.dumps(value).replace(json.dumps(SENTINEL), draw(st.sampled_from(RAW_VALUES)))
            return text.encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()


def header_text() -> st.SearchStrategy:
    return st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


def auth_for(api: str, key: str) -> dict[str, str]:
    if api == "eachlabs":
        return {"X-API-Key": key}
    return {"Authorization": f"{'Key' if api == 'fal' else 'Bearer'} {key}"}


@st.composite
def requests_(draw, doc: dict, jobs: list[str], key: str) -> tuple[str, str, dict[str, str], bytes | None]:
    ops = [(path, method.upper(), op) for path, item in doc["paths"].items() for method, op in item.items()]
    with_body = [o for o in ops if "requestBody" in o[2]]
    about_jobs = [o for o in ops if any(p["in"] == "path" for p in o[2].get("parameters", ()))]
    pick = draw(st.integers(0, 19))  # mostly what takes input: bodies, then job ids
    if pick == 0:  # somewhere no route is
        path = draw(st.sampled_from(PATH_TEMPLATES)).format(draw(st.sampled_from(BAD_SEGMENTS) | header_text()))
        method, op = draw(st.sampled_from(METHODS)), {}
    else:
        path, method, op = draw(st.sampled_from(with_body if pick < 12 else about_jobs if pick < 18 else ops))
    api = routed_api(method, path, httpx.Headers())
    headers = auth_for(api, key) if draw(st.integers(0, 5)) else draw(st.sampled_from([
        {}, {"Authorization": ""}, {"Authorization": "Key nope-nope-1"}, {"Authorization": "Basic eDp5"},
        {"X-API-Key": "x" * 2000}, auth_for(draw(st.sampled_from(["fal", "eachlabs", "openai"])), key)]))
    query = {}
    for param in op.get("parameters", []):
        if param["in"] == "path":
            # One of the fuzz's own jobs (by index: the same draws whatever the list holds, as shrinking needs).
            own = st.integers(0, 2**16).map(lambda i: jobs[i % len(jobs)] if jobs else str(uuid.uuid4()))
            segment = draw(own | st.just(str(uuid.uuid4())) | st.sampled_from(BAD_SEGMENTS))
            path = path.replace("{" + param["name"] + "}", segment)
        elif draw(st.booleans()):
            value = draw(from_schema(doc, param["schema"], param["name"]).map(str) | header_text())
            if param["in"] == "query":
                query[param["name"]] = value
            else:
                headers[param["name"]] = value
    extra = draw(st.sampled_from([
        {}, {}, {}, {"Host": "queue.llava.example"}, {"Content-Type": "text/plain"}, {"Content-Type": ""},
        {"x-fal-target-url": f"https://queue.fal.run{APP}"}, {"x-fal-target-url": "https://evil.example/x"},
        {"x-fal-target-url": f"https://fal.run{APP}/requests/{uuid.uuid4()}/status"}, {"X-Fal-Request-Timeout": "inf"},
        {"Accept": "text/event-stream"}, {"X-Request-Id": "abc"}, {"Origin": "https://app.example"}]))
    headers.update(extra)
    if draw(st.integers(0, 7)) == 0:
        headers[draw(st.sampled_from(["X-Fal-Request-Timeout", "X-Api-Key", "Authorization", "X-Odd"]))] = draw(
            header_text())
    body = None
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if schema is not None or method in ("POST", "PUT") and draw(st.booleans()):
        value = draw(from_schema(doc, schema)) if schema is not None else draw(HOSTILE)
        body = mutated(draw, value)
        headers.setdefault("Content-Type", "application/json")
    if query:
        path += "?" + "&".join(f"{k}={httpx.QueryParams({k: v})[k]}" for k, v in query.items())
    return method, path, headers, body



def fuzz_wire(client: httpx.Client, key: str, max_examples: int, *, unavailable_ok: tuple[str, ...] = (),
              follow_timeout_s: float = 10.0) -> Counter:
    """Send `max_examples` hostile requests built from the served OpenAPI document with `key` (limits high enough
    not to be the point); every answer checked, every accepted job followed to its end. Deterministic
    (derandomize): the same requests each run. Prints what was sent and answered; returns the counts."""
    doc = client.get("/openapi.json").json()
    jobs: list[str] = []
    sent: Counter = Counter()
    seen: Counter = Counter()
    began = time.monotonic()

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data):
        method, path, headers, body = data.draw(requests_(doc, jobs, key))
        try:
            resp = client.request(method, path, headers=headers, content=body, follow_redirects=False)
        except httpx.LocalProtocolError:
            reject()  # no HTTP/1.1 client sends it (a header value of spaces): nothing reaches the server
        except httpx.InvalidURL:
            reject()
        api = routed_api(method, path.split("?")[0], httpx.Headers(headers))
        sent[api] += 1
        seen[(api, resp.status_code)] += 1
        found = problems(resp, unavailable_ok=path.split("?")[0] in unavailable_ok)
        assert not found, (f"{method} {path[:200]} {headers} {body[:300] if body else body!r} -> "
                           f"{resp.status_code} {found}")
        accepted = resp.status_code == 200 and resp.headers.get("content-type", "").startswith("application/json")
        got = resp.json() if accepted and method == "POST" else {}
        if isinstance(got, dict) and ("status_url" in got or "predictionID" in got):
            owner = {k: v for k, v in headers.items() if k.lower() in ("authorization", "x-api-key")}
            # Checked on the way: nothing accepted becomes unreadable.
            done = follow_job(client, resp, owner, timeout=follow_timeout_s)
            jobs.append(got.get("request_id") or got["predictionID"])
            seen[(api, "job read back", done.status_code)] += 1

    try:
        fuzz()
    finally:
        print(f"\nwire fuzz: {sum(sent.values())} requests in {time.monotonic() - began:.1f} s; per API "
              f"{dict(sorted(sent.items()))}; jobs accepted and read back: {len(jobs)}")
        for counted, count in sorted(seen.items(), key=str):
            print(f"  {' '.join(map(str, counted))}: {count}")
    return seen
