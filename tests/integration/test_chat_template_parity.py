"""Our chat rendering gives exactly the tokens vLLM's own OpenAI server gives for the same messages.

vLLM's side is its server's code path without an engine, wired as `vllm serve <model>
--chat-template serve/api/llava_v1.jinja` wires it: `OnlineRenderer.render_chat` (what
`OpenAIServingChat` delegates to: parse the messages, load the data: URI image, apply the template,
tokenize, expand the image placeholder), then `InputProcessor.process_inputs`, which turns that
engine input into the `EngineCoreRequest` the engine core gets. Our side is the OpenAI route's own
reading of the messages (`serve.api.openai.protocol.conversation`, which renders through
`serve.api.chat`) and the prompt dict our engine gives `AsyncLLM.generate`, through the same `InputProcessor` (the one
`AsyncLLM` builds over the same renderer). Both use the engine arguments of configs/local-cpu.yaml
with the tiny model, and the token ids compared are the engine's, image tokens included.

vLLM's request sets `"add_special_tokens": true` because our template has no BOS: a template that
writes BOS as text makes Llama tokenizers with prepend_scheme "first" drop the first word's "▁",
unlike LLaVA's training, so on both paths the tokenizer adds BOS itself.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from serve.api.chat import IMAGE_TOKEN, TEMPLATE_PATH
from serve.api.openai.protocol import ChatRequest, conversation
from serve.config import parse_config
from serve.engine.tiny_model import IMAGE_SEQ_LENGTH
from serve.engine.vllm_engine import build_engine_args
from serve.media.decode import decode_image
from tests.conftest import CONFIGS, data_uri, image_bytes

IMAGE_URL = data_uri()  # vLLM loads the data: URI itself; our side decodes the same bytes


def _image() -> dict:
    return {"type": "image_url", "image_url": {"url": IMAGE_URL}}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


CASES = {
    "image-first": [{"role": "user", "content": [_image(), _text("What is in this picture?")]}],
    "image-last": [{"role": "user", "content": [_text("What is in this picture?"), _image()]}],
    "system": [
        {"role": "system", "content": "You are a terse assistant. Answer in one word."},
        {"role": "user", "content": [_image(), _text("Which colour fills the image?")]},
    ],
    "multi-turn": [
        {"role": "user", "content": [_image(), _text("What is in this picture?")]},
        {"role": "assistant", "content": "A red rectangle."},
        {"role": "user", "content": "And what shade of red is it?"},
    ],
    "text-only": [
        {"role": "system", "content": "You answer questions about geography."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": [_text("And of Italy?")]},
    ],
    "two-texts": [{"role": "user", "content": [_text("Look closely."), _text("What is shown here?")]}],
    "two-texts-image-between": [
        {"role": "user", "content": [_text("Look closely."), _image(), _text("What is shown here?")]}
    ],
}


def has_image(messages: list[dict]) -> bool:
    return any(isinstance(m["content"], list) and any(p["type"] == "image_url" for p in m["content"]) for m in messages)


@pytest.fixture(scope="module")
def vllm_side(tiny_model_dir):
    """vLLM's objects for the tiny model, built as `vllm serve` and AsyncLLM build them; no engine."""
    data = yaml.safe_load((CONFIGS / "local-cpu.yaml").read_text())
    data["model"]["source"] = str(tiny_model_dir)
    cfg = parse_config(data, CONFIGS, env={})
    with pytest.MonkeyPatch.context() as mp:
        for name, value in cfg.engine.env.items():  # the engine's environment (VLLM_HOST_IP, ...)
            mp.setenv(name, value)

        from vllm.entrypoints.launchers.cli_args import make_arg_parser, resolve_default_chat_template_kwargs
        from vllm.renderers import renderer_from_config
        from vllm.renderers.chat_utils import load_chat_template
        from vllm.renderers.online_renderer import OnlineRenderer
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.input_processor import InputProcessor

        vllm_config = build_engine_args(cfg).create_engine_config()
        renderer = renderer_from_config(vllm_config)  # as AsyncLLM.__init__
        input_processor = InputProcessor(vllm_config, renderer)  # as AsyncLLM.__init__
        # The server's front-end options as `vllm serve` parses them (defaults but the template).
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(
            [str(tiny_model_dir), "--chat-template", str(TEMPLATE_PATH)]
        )
        online = OnlineRenderer(  # as vLLM's api_server app_state: over the engine client's renderer
            model_config=vllm_config.model_config,
            renderer=renderer,
            request_logger=None,
            chat_template=load_chat_template(args.chat_template),
            chat_template_content_format=args.chat_template_content_format,
            trust_request_chat_template=args.trust_request_chat_template,
            trust_request_mm_kwargs=args.trust_request_mm_kwargs,
            enable_auto_tools=args.enable_auto_tool_choice,
            exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
            tool_parser=args.tool_call_parser,
            tool_strict_level=args.tool_strict_level,
            reasoning_parser=vllm_config.structured_outputs_config.reasoning_parser,
            default_chat_template_kwargs=resolve_default_chat_template_kwargs(args),
        )
        online.warmup()
        try:
            yield cfg, online, input_processor
        finally:
            renderer.shutdown()


def _engine_request(input_processor, request_id: str, prompt):
    """What AsyncLLM.add_request hands the engine core for `prompt` (a rendered input or a raw dict)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1)
    return input_processor.process_inputs(request_id, prompt, params, supported_tasks=("generate",))


def vllm_chat_tokens(online, input_processor, messages: list[dict]):
    """vLLM's OpenAI server: a ChatCompletionRequest with these messages and add_special_tokens."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    request = ChatCompletionRequest(model="tiny-llava", messages=messages, add_special_tokens=True)
    result = asyncio.run(online.render_chat(request))
    assert not isinstance(result, ErrorResponse), result
    _, (engine_input,) = result
    return engine_input.get("prompt"), _engine_request(input_processor, "vllm-chat", engine_input)


def our_tokens(cfg, input_processor, messages: list[dict]):
    """The OpenAI route's prompt text, the decoded image beside it, as our engine sends them (vllm_engine.py)."""
    conv = conversation(ChatRequest.model_validate_json(json.dumps({"model": "tiny-llava", "messages": messages})))
    assert (conv.image_url is not None) == has_image(messages)
    text = conv.prompt
    prompt: dict = {"prompt": text}
    if has_image(messages):
        prompt["multi_modal_data"] = {"image": decode_image(image_bytes(), cfg.media)}
    return text, _engine_request(input_processor, "ours", prompt)


@pytest.mark.parametrize("name", list(CASES))
def test_render_gives_vllm_chat_tokens(vllm_side, name):
    cfg, online, input_processor = vllm_side
    messages = CASES[name]
    vllm_text, theirs = vllm_chat_tokens(online, input_processor, messages)
    our_text, ours = our_tokens(cfg, input_processor, messages)

    assert list(ours.prompt_token_ids) == list(theirs.prompt_token_ids), (
        f"token ids differ\n vLLM's chat text: {vllm_text!r}\n our text:         {our_text!r}"
    )
    ids = list(ours.prompt_token_ids)

    tokenizer = input_processor.get_tokenizer()
    bos = tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == input_processor.model_config.hf_config.image_token_index
    assert IMAGE_SEQ_LENGTH == 576  # LLaVA-1.5's image: 24 x 24 patches
    expected_images = IMAGE_SEQ_LENGTH if has_image(messages) else 0
    assert ids.count(image_id) == expected_images

    def placements(req):  # where the engine places the image's features: the same run of tokens
        return [(f.modality, f.mm_position.offset, f.mm_position.length) for f in req.mm_features or ()]

    assert placements(ours) == placements(theirs)
    if expected_images:
        ((_, offset, length),) = placements(ours)
        assert length == IMAGE_SEQ_LENGTH and ids[offset : offset + length] == [image_id] * length
