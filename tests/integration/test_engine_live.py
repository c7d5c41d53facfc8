"""The LLMServer deployment through its real handle: the stream contract and cancellation."""

from __future__ import annotations

import uuid

import pytest
from PIL import Image
from ray import serve

from serve.api.chat import single_turn
from serve.app import ENGINE_DEPLOYMENT
from serve.engine.types import Completion, GenerationRequest, TextDelta
from tests.integration.conftest import wait_for_abort


@pytest.fixture
def llm(stack, stack_config):
    return serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=stack_config.app_name).options(stream=True)


def request(cfg, *, stream: bool, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=str(uuid.uuid4()),
        owner="tests",
        prompt=single_turn("Describe the picture."),
        image=Image.new("RGB", (50, 80), (10, 100, 200)),
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        stream=stream,
    )


def test_stream_is_deltas_then_one_completion(llm, stack_config):
    streamed = list(llm.generate.remote(request(stack_config, stream=True, max_tokens=40)))
    *deltas, done = streamed
    assert isinstance(done, Completion) and all(isinstance(d, TextDelta) for d in deltas)
    assert len(deltas) > 1  # delivered incrementally, not at the end
    assert sum(d.num_tokens for d in deltas) == done.num_output_tokens == 40
    assert done.finish_reason == "length" and done.num_input_tokens > 576

    whole = list(llm.generate.remote(request(stack_config, stream=False, max_tokens=40)))
    assert len(whole) == 2 and isinstance(whole[0], TextDelta)  # one delta at the end, then the counts
    assert whole[0].text == "".join(d.text for d in deltas)  # same greedy answer either way
    assert whole[1] == done


def test_cancelling_a_call_aborts_it_in_vllm(llm, stack_config, engine_stats):
    before = engine_stats()
    gen = llm.generate.remote(request(stack_config, stream=True, max_tokens=2048))
    first = [next(gen) for _ in range(3)]
    assert all(isinstance(d, TextDelta) for d in first)
    gen.cancel()
    now = wait_for_abort(engine_stats, before)
    assert now["aborted"] == before["aborted"] + 1 and now["running"] == 0, now
    assert now["finished"] == before["finished"], now
