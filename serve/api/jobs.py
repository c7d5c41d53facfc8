"""What every API's job executor does: fetch the image, generate on the engine, log real events."""

from __future__ import annotations

from typing import Callable

from PIL import Image

from serve.api.services import Services
from serve.engine.types import GenerationRequest, collect
from serve.jobs.models import JobResult
from serve.jobs.runner import LogFn


async def generate_for_job(
    services: Services, image_url: str, build: Callable[[Image.Image], GenerationRequest], log: LogFn
) -> JobResult:
    image = await services.media.load(image_url)
    await log(f"Image fetched ({image.width}x{image.height})")
    await log("Generating")
    chunks, done = await collect(services.engine.generate(build(image)))
    await log(f"Generated {done.num_output_tokens} tokens from {done.num_input_tokens} input tokens")
    return JobResult(
        chunks=chunks,
        num_input_tokens=done.num_input_tokens,
        num_output_tokens=done.num_output_tokens,
        finish_reason=done.finish_reason,
    )
