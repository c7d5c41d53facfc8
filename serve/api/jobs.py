"""What every API's job executor does: fetch the image, generate on the engine, log real events;
and, when the job has ended, send its webhook."""

from __future__ import annotations

import time
from typing import Any, Callable

from PIL import Image

from serve.api.services import Services
from serve.engine.types import GenerationRequest, collect, started
from serve.jobs.models import Job, JobResult
from serve.jobs.runner import LogFn
from serve.telemetry.metrics import metrics


async def generate_for_job(
    services: Services, job: Job, image_url: str, build: Callable[[Image.Image], GenerationRequest], log: LogFn
) -> JobResult:
    began = time.monotonic()
    image = await services.media.load(image_url)
    await log(f"Image fetched ({image.width}x{image.height})")
    await log("Generating")
    items = await started(services.engine.generate(build(image)))
    metrics().first_token(job.api, "job", time.monotonic() - began)
    chunks, done = await collect(items)
    metrics().generated(job.api, job.owner, done.num_input_tokens, done.num_output_tokens)
    await log(f"Generated {done.num_output_tokens} tokens from {done.num_input_tokens} input tokens")
    return JobResult(
        chunks=chunks,
        num_input_tokens=done.num_input_tokens,
        num_output_tokens=done.num_output_tokens,
        finish_reason=done.finish_reason,
    )


def send_webhook(
    services: Services, job: Job, url: str, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    """Deliver a job's webhook in the background; if this replica stops before the delivery ends,
    the job goes back to the store's outbox and another runner delivers it."""
    store = services.store
    services.webhooks.send(url, payload, headers, on_abandon=lambda: store.renotify(job.id))
