"""The one step from any API's user inputs to the internal GenerationRequest."""

from __future__ import annotations

from PIL import Image

from serve.config import ModelConfig
from serve.engine.types import GenerationRequest

# vLLM needs top_p in (0, 1]; both APIs allow 0, whose meaning (keep only the top token) this keeps.
_MIN_TOP_P = 1e-6


def generation_request(
    *, request_id: str, owner: str, model: ModelConfig, prompt: str, image: Image.Image,
    max_tokens: int, temperature: float, top_p: float, stream: bool,
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        owner=owner,
        prompt=model.render_prompt(prompt),
        image=image,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=max(top_p, _MIN_TOP_P),
        stream=stream,
    )
