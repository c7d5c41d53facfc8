"""The one step from any API's user inputs to the internal GenerationRequest."""

from __future__ import annotations

from PIL import Image

from serve.engine.types import GenerationRequest

# vLLM needs top_p in (0, 1]; every API allows 0, whose meaning (keep only the top token) this keeps.
_MIN_TOP_P = 1e-6


def generation_request(
    *, request_id: str, owner: str, prompt: str, image: Image.Image | None, max_tokens: int | None,
    temperature: float, top_p: float, stream: bool, stop: tuple[str, ...] = (), seed: int | None = None,
) -> GenerationRequest:
    """`prompt` is rendered already (serve/api/chat.py), with one image placeholder per image."""
    return GenerationRequest(
        request_id=request_id,
        owner=owner,
        prompt=prompt,
        image=image,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=max(top_p, _MIN_TOP_P),
        stream=stream,
        stop=stop,
        seed=seed,
    )
