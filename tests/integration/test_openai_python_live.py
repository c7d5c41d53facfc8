"""OpenAI chat completions on the live stack with the official Python SDK (docs/api.md §8), sync and async,
pointed at `<stack>/v1`: code written for OpenAI runs by changing `base_url` and the key."""

from __future__ import annotations

import asyncio

import openai
import pytest
import requests
from openai import AsyncOpenAI, OpenAI
from transformers import AutoTokenizer

from serve.api.chat import single_turn
from serve.engine.tiny_model import IMAGE_SEQ_LENGTH
from tests.conftest import LOCAL_KEY, data_uri
from tests.integration.conftest import SHARED_KEY, SHARED_LIMIT, wait_for_abort

QUESTION = "What is in this picture?"


def client(stack, key=LOCAL_KEY, cls=OpenAI):
    return cls(base_url=f"{stack}/v1", api_key=key, max_retries=0, timeout=120)


def ask(text=QUESTION, image=True):
    parts = [{"type": "image_url", "image_url": {"url": data_uri()}}] if image else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def model(stack_config) -> str:
    return stack_config.model.served_name


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def prompt_tokens(tokenizer, prompt: str, images: int) -> int:
    # The rendered prompt's tokens (BOS included), each <image> expanded to the image's 576.
    return len(tokenizer(prompt).input_ids) + images * (IMAGE_SEQ_LENGTH - 1)


def test_models_list_and_retrieve(stack, model):
    with client(stack) as c:
        assert [m.id for m in c.models.list()] == [model]
        got = c.models.retrieve(model)
    assert got.id == model and got.object == "model" and got.owned_by == "llava-serve"


def test_chat_with_an_image_counts_every_prompt_token(stack, model, tokenizer):
    with client(stack) as c:
        resp = c.chat.completions.create(model=model, messages=ask(), max_tokens=12, temperature=0)
    (choice,) = resp.choices
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == model
    assert choice.message.role == "assistant" and len(choice.message.content) == 12 and choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == prompt_tokens(tokenizer, single_turn(QUESTION), 1)
    assert (resp.usage.completion_tokens, resp.usage.total_tokens) == (12, resp.usage.prompt_tokens + 12)


def test_text_only_multi_turn_reaches_vllm_without_an_image(stack, model, tokenizer):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "And now?"}]
    with client(stack) as c:
        resp = c.chat.completions.create(model=model, messages=messages, max_completion_tokens=5, temperature=0)
    expected = "Answer briefly. USER: Hi ASSISTANT: Hello</s>USER: And now? ASSISTANT:"
    assert resp.usage.prompt_tokens == prompt_tokens(tokenizer, expected, 0)
    assert resp.usage.completion_tokens == 5


def test_seed_and_stop_reach_the_sampler(stack, model):
    with client(stack) as c:
        def sample(**kw):
            return c.chat.completions.create(model=model, messages=ask(), max_tokens=24, temperature=1.0, **kw)

        a, b, other = sample(seed=1234), sample(seed=1234), sample(seed=4321)
        assert a.choices[0].message.content == b.choices[0].message.content  # same seed, same sample
        assert other.choices[0].message.content != a.choices[0].message.content  # the seed is what decides
        text = a.choices[0].message.content
        cut = text[8]
        stopped = sample(seed=1234, stop=[cut])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[:text.index(cut)]  # ends before the stop string


def test_stream_with_usage(stack, model):
    with client(stack) as c:
        chunks = list(c.chat.completions.create(model=model, messages=ask(), max_tokens=10, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
    assert len({(ch.id, ch.created) for ch in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)) == 10
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_async_client_chat_and_stream(stack, model):
    async def main():
        async with client(stack, cls=AsyncOpenAI) as c:
            one = c.chat.completions.create(model=model, messages=ask(), max_tokens=6, temperature=0)
            two = c.chat.completions.create(model=model, messages=ask(), max_tokens=6, temperature=0)
            done = await asyncio.gather(one, two)
            stream = await c.chat.completions.create(model=model, messages=ask(), max_tokens=6, temperature=0,
                                                     stream=True)  # greedy: one ASCII character per token
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
        return done, text

    (a, b), text = asyncio.run(main())
    assert a.choices[0].message.content == b.choices[0].message.content and len(text) == 6
    assert a.id != b.id


def test_errors_map_to_the_sdk_exceptions(stack, model):
    with client(stack, key="not-a-key-at-all") as c, pytest.raises(openai.AuthenticationError):
        c.models.list()
    with client(stack) as c:
        with pytest.raises(openai.NotFoundError) as missing:
            c.chat.completions.create(model="gpt-4o", messages=ask(), max_tokens=2)
        assert missing.value.code == "model_not_found" and missing.value.param == "model"
        with pytest.raises(openai.BadRequestError) as bad:
            c.chat.completions.create(model=model, messages=ask(), max_tokens=2, temperature=3)
        assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"
        two = ask()
        two[0]["content"].insert(1, {"type": "image_url", "image_url": {"url": data_uri()}})
        with pytest.raises(openai.BadRequestError) as images:
            c.chat.completions.create(model=model, messages=two, max_tokens=2)
        assert "At most 1 image" in images.value.message and images.value.param == "messages[0].content[1]"
        with pytest.raises(openai.BadRequestError) as unreachable:
            c.chat.completions.create(model=model, max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://10.255.255.1/a.png"}}]}])
        assert unreachable.value.code == "invalid_image_url"
        with pytest.raises(openai.BadRequestError) as empty_stop:  # vLLM refuses it too: a 400, never a 500
            c.chat.completions.create(model=model, messages=ask(), max_tokens=2, stop="")
        assert empty_stop.value.param == "stop"


def test_one_budget_across_fal_and_openai_and_a_429_with_retry_after(stack, model):
    """The key's SHARED_LIMIT/min is one window: fal and OpenAI draw on it alike (docs/api.md §8.1)."""
    fal = {"prompt": "hi", "image_url": data_uri(), "max_new_tokens": 1}
    assert requests.post(f"{stack}/fal-ai/llavav15-13b", json=fal, headers={"Authorization": f"Key {SHARED_KEY}"},
                         timeout=60).status_code == 200
    with client(stack, key=SHARED_KEY) as c:
        for _ in range(SHARED_LIMIT - 1):
            c.chat.completions.create(model=model, messages=ask(), max_tokens=1)
        with pytest.raises(openai.RateLimitError) as refused:
            c.chat.completions.create(model=model, messages=ask(), max_tokens=1)
    headers = refused.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60 and headers["x-ratelimit-remaining"] == "0"
    assert refused.value.code == "rate_limit_exceeded"
    fal_again = requests.post(f"{stack}/fal-ai/llavav15-13b", json=fal, headers={"Authorization": f"Key {SHARED_KEY}"},
                              timeout=60)
    assert fal_again.status_code == 429


def test_leaving_mid_stream_aborts_the_generation_in_vllm(stack, model, engine_stats):
    before = engine_stats()
    with client(stack) as c:
        stream = c.chat.completions.create(model=model, messages=ask(), max_tokens=3000, stream=True)
        got = [next(stream) for _ in range(3)]
        stream.close()
    assert got[0].choices[0].delta.role == "assistant"
    after = wait_for_abort(engine_stats, before)
    assert after["aborted"] > before["aborted"] and after["running"] == 0
