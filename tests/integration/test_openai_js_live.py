"""OpenAI chat completions on the live stack with the official JS SDK, `openai@6.49.0`, pointed at
`<stack>/v1`: one completion with an image, and a stream with `stream_options.include_usage`; and the CORS
preflight a browser sends for it."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from serve.ingress import create_app
from tests.conftest import LOCAL_KEY, data_uri
from tests.fakes import FakeEngine, make_services
from tests.integration.conftest import JS_CLIENTS, run_js

MAX_TOKENS = 8  # what openai.mjs asks for; the test model emits one character per token, never stopping early


def openai_js(stack: str, model: str, scenario: str) -> dict:
    return run_js("openai.mjs", scenario,
                  env={"LLAVA_BASE_URL": stack, "OPENAI_API_KEY": LOCAL_KEY, "MODEL": model, "IMAGE": data_uri()})


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def assert_usage(usage: dict) -> None:
    assert is_int(usage["prompt_tokens"]) and usage["prompt_tokens"] > 576, usage  # the image's 576 tokens + the prompt
    assert usage["completion_tokens"] == MAX_TOKENS and is_int(usage["completion_tokens"]), usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage


def test_js_openai_chat_completion(stack, stack_config):
    completion = openai_js(stack, stack_config.model.served_name, "chat")["completion"]
    assert completion["object"] == "chat.completion", completion
    assert completion["id"].startswith("chatcmpl-"), completion
    assert completion["model"] == stack_config.model.served_name, completion
    assert is_int(completion["created"]) and completion["created"] > 0, completion
    assert len(completion["choices"]) == 1, completion
    choice = completion["choices"][0]
    assert choice["index"] == 0, choice
    assert choice["message"]["role"] == "assistant", choice
    assert isinstance(choice["message"]["content"], str) and len(choice["message"]["content"]) == MAX_TOKENS, choice
    assert choice["finish_reason"] == "length", choice
    assert_usage(completion["usage"])


def test_js_openai_stream_with_usage(stack, stack_config):
    out = openai_js(stack, stack_config.model.served_name, "stream")
    chunks = out["chunks"]
    assert len(chunks) >= 2, chunks  # the completion's, then the usage
    # One completion: every chunk carries its id and creation time, in OpenAI's chunk shape.
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-"), chunks
    assert len({chunk["created"] for chunk in chunks}) == 1 and is_int(chunks[0]["created"]), chunks
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks), chunks
    assert all(chunk["model"] == stack_config.model.served_name for chunk in chunks), chunks
    *body, last = chunks
    assert all(len(chunk["choices"]) == 1 and chunk["choices"][0]["index"] == 0 for chunk in body), chunks
    assert body[0]["choices"][0]["delta"]["role"] == "assistant", chunks
    assert isinstance(out["content"], str) and len(out["content"]) == MAX_TOKENS, out
    finishes = [chunk["choices"][0]["finish_reason"] for chunk in body if chunk["choices"][0].get("finish_reason")]
    assert finishes == ["length"] and out["finishReason"] == "length", chunks
    assert body[-1]["choices"][0]["finish_reason"] == "length", chunks  # nothing but the usage after the finish
    # include_usage: one more chunk, with no choices and the whole request's usage; the others have none.
    assert last["choices"] == [] and out["usageChunk"] == last, chunks
    assert_usage(last["usage"])
    assert all(chunk.get("usage") is None for chunk in body), chunks


def test_a_browser_preflight_admits_every_header_the_sdk_sends():
    """openai with dangerouslyAllowBrowser: the preflight must admit each header the SDK can set, read from its
    own source, so a new one in a future SDK fails here (docs/api.md §1.4)."""
    found = set()
    for path in (JS_CLIENTS / "node_modules" / "openai").rglob("*.mjs"):
        found |= {h.lower() for h in re.findall(r"[Xx]-[Ss]tainless-[A-Za-z-]+|OpenAI-(?:Organization|Project)",
                                                  path.read_text(errors="replace"))}
    assert "x-stainless-helper-method" in found and "openai-project" in found, found  # the scan sees them
    with TestClient(create_app(make_services(FakeEngine()))) as client:
        resp = client.options("/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": ",".join(["authorization", "content-type", *sorted(found)])})
    assert resp.status_code == 200, resp.text
