"""vLLM serves the tiny model exactly as transformers runs it: greedy token ids match.

A match on several images and prompts means vLLM found every weight, processed the image the
same way and placed the 576 image tokens where transformers does.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from serve.api.chat import single_turn
from serve.engine.tiny_model import IMAGE_SEQ_LENGTH

MAX_TOKENS = 32


def _prompt(question: str) -> str:
    # The served template (llava_v1), as the ingress renders it.
    return single_turn(question)


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


# Different sizes and aspect ratios (landscape, square, tall, wide) and two prompts.
PAIRS = [
    (_image(640, 480, 1), _prompt("What is in this picture?")),
    (_image(336, 336, 2), _prompt("What is in this picture?")),
    (_image(200, 900, 3), _prompt("Describe the colours, please.")),
    (_image(700, 100, 4), _prompt("Describe the colours, please.")),
]


def test_vllm_greedy_matches_transformers(tiny_model_dir, monkeypatch):
    model_dir = tiny_model_dir

    # transformers first: vLLM's CPU worker pins the process's threads when it starts.
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    image_token_id = model.config.image_token_index
    hf_prompt_ids, hf_output_ids = [], []
    for image, prompt in PAIRS:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
        n_prompt = inputs["input_ids"].shape[1]
        hf_prompt_ids.append(inputs["input_ids"][0].tolist())
        hf_output_ids.append(out[0, n_prompt:].tolist())
    del model

    # Test settings: engine in this process, no torch.compile, a small KV cache.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        max_model_len=4096,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 1},
        kv_cache_memory_bytes=64 * 1024 * 1024,
    )
    outputs = llm.generate(
        [{"prompt": prompt, "multi_modal_data": {"image": image}} for image, prompt in PAIRS],
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
    )

    for output, prompt_ids, output_ids in zip(outputs, hf_prompt_ids, hf_output_ids, strict=True):
        assert list(output.prompt_token_ids) == prompt_ids
        assert list(output.prompt_token_ids).count(image_token_id) == IMAGE_SEQ_LENGTH
        completion = output.outputs[0]
        assert list(completion.token_ids) == output_ids
        # The model never picks EOS, so greedy runs to max_tokens in both.
        assert len(completion.token_ids) == MAX_TOKENS
        assert completion.finish_reason == "length"
    # The image and the prompt both change the output, so a match above is not a coincidence.
    assert len({tuple(ids) for ids in hf_output_ids}) == len(PAIRS)
