"""The serving core every API shares: one place owns a generation's lifetime, one accepts a job, one
runs a job on the engine. An API's serving module (serve/api/<api>/serving.py) adds only its wire
shapes; its routes only read the request and call it (docs/architecture.md, "Adding an API").
"""

from __future__ import annotations

import re
import time
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator

from PIL import Image

from serve.api.limits import admitted
from serve.api.services import Services
from serve.auth import Caller
from serve.engine.types import Completion, EngineUnavailable, GenerationRequest, StreamItem, collect, started
from serve.jobs.models import Admission, Job, JobResult, LimitExceeded
from serve.jobs.runner import LogFn
from serve.telemetry.access import RequestContext
from serve.telemetry.metrics import metrics

BuildRequest = Callable[[Image.Image | None], GenerationRequest]  # the loaded image (None: text only)


@dataclass(frozen=True)
class Generation:
    admission: Admission  # the caller's limit decision (for the rate-limit headers)
    items: AsyncGenerator[StreamItem, None]  # the engine stream, already started


@asynccontextmanager
async def generation(
    services: Services, ctx: RequestContext, caller: Caller, image_url: str | None, build: BuildRequest, *,
    stream: bool, start_timeout_s: float | None = None,
) -> AsyncIterator[Generation]:
    """admit -> concurrency slot -> image -> engine stream started; on every exit path the engine stream
    is closed (a caller that left aborts the request) and the slot released. The start timeout counts
    from the admission; failures before the first token raise here, where they can still be an HTTP error."""
    async with AsyncExitStack() as held:  # exits in reverse: the engine stream closes, then the slot frees
        with counting_refusals(ctx, caller):
            admission = await held.enter_async_context(admitted(services.store, caller, services.config.jobs.lease_s))
        # Admitted: the start timeout and the time to first token count from here.
        items = await _start(services, ctx.api, "stream" if stream else "sync", image_url, build, start_timeout_s)
        held.push_async_callback(items.aclose)
        yield Generation(admission, items)


async def _start(
    services: Services, api: str, mode: str, image_url: str | None, build: BuildRequest,
    start_timeout_s: float | None = None, log: LogFn | None = None,
) -> AsyncGenerator[StreamItem, None]:
    """Image (if any), then the engine stream up to its first item (sync, stream and job alike)."""
    began = time.monotonic()
    image = None if image_url is None else await services.media.load(image_url)
    if log is not None:
        if image is not None:
            await log(f"Image fetched ({image.width}x{image.height})")
        await log("Generating")
    left = None if start_timeout_s is None else max(0.0, start_timeout_s - (time.monotonic() - began))
    items = await started(services.engine.generate(build(image)), left)
    metrics().first_token(api, mode, time.monotonic() - began)
    return items


async def _collect(items: AsyncIterator[StreamItem], api: str, owner: str) -> tuple[list[str], Completion]:
    chunks, done = await collect(items)
    metrics().generated(api, owner, done.num_input_tokens, done.num_output_tokens)
    return chunks, done


async def open_generation(*args: Any, **kwargs: Any) -> tuple[Generation, Callable[[], Awaitable[None]]]:
    """`generation` held open past the route's return (a streamed response): returns it with the
    callable that ends it, which the response runs however the stream ends."""
    held = AsyncExitStack()
    gen = await held.enter_async_context(generation(*args, **kwargs))
    return gen, held.aclose


async def streamed(gen: Generation, ctx: RequestContext, caller: Caller) -> AsyncGenerator[StreamItem, None]:
    """A streamed answer's engine items, up to and including its completion (counted in the metrics); a
    stream that ends without one raises, for the API to end its stream with an error."""
    async for item in gen.items:
        yield item
        if isinstance(item, Completion):
            metrics().generated(ctx.api, caller.name, item.num_input_tokens, item.num_output_tokens)
            return
    raise EngineUnavailable("engine stream ended without a completion")


async def complete(gen: Generation, ctx: RequestContext, caller: Caller) -> tuple[list[str], Completion]:
    """The whole answer of a non-streamed generation: its text chunks and final counts."""
    return await _collect(gen.items, ctx.api, caller.name)


async def accept(services: Services, ctx: RequestContext, caller: Caller, job: Job, *, cap_pending: bool) -> Admission:
    """Put a job in the store's queue, counted against the caller's limits (refusals raise LimitExceeded).
    With `cap_pending`, queued jobs count against the concurrency cap too."""
    with counting_refusals(ctx, caller):
        admission = await services.store.enqueue(job, caller.limits, cap_pending=cap_pending)
        if not admission.allowed:
            raise LimitExceeded(admission)
    return admission


# What a job id taken from a path may look like. Ids are UUIDs this server made (docs/api.md §1.4), so nothing
# else names a job; and the id a read is about becomes the request's (fal's x-fal-request-id, the access line),
# where a %00 or %0a made the HTTP server drop the connection unanswered, and a non-Latin-1 character a 500.
_JOB_ID = re.compile(r"[0-9A-Za-z._~-]{1,128}")


def read(services: Services, ctx: RequestContext, caller: Caller, job_id: str) -> bool:
    """A read about the job `job_id` (polls, results, cancels): the request becomes that job's, and spends
    one of the caller's reads, their own budget, never the generation limits (docs/bounds.md, "Reads"); a
    refusal raises LimitExceeded, counted like the others. False, spending nothing, for an id no job can have:
    the API answers its 404."""
    if not _JOB_ID.fullmatch(job_id):
        return False
    ctx.request_id = job_id
    with counting_refusals(ctx, caller):
        services.reads.take(caller.name)
    return True


@contextmanager
def counting_refusals(ctx: RequestContext, caller: Caller) -> Iterator[None]:
    """Counts a limit refusal in the metrics, by API and key, on its way out."""
    try:
        yield
    except LimitExceeded as exc:
        metrics().rate_limited(ctx.api, caller.name, exc.admission.reason or "")
        raise


async def run_job(services: Services, job: Job, image_url: str, build: BuildRequest, log: LogFn) -> JobResult:
    """A job's work, whichever API accepted it: fetch the image, generate, log real events."""
    items = await _start(services, job.api, "job", image_url, build, log=log)
    chunks, done = await _collect(items, job.api, job.owner)
    await log(f"Generated {done.num_output_tokens} tokens from {done.num_input_tokens} input tokens")
    return JobResult(chunks=chunks, num_input_tokens=done.num_input_tokens,
                     num_output_tokens=done.num_output_tokens, finish_reason=done.finish_reason)


def send_webhook(
    services: Services, job: Job, url: str, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    """Deliver a job's webhook in the background, and tell the store when the delivery is over (its outbox
    lease goes); if this replica stops before then, the job goes back to the store's outbox at once and another
    runner delivers it."""
    store = services.store
    services.webhooks.send(url, payload, headers, on_abandon=lambda: store.renotify(job.id),
                           on_end=lambda: store.notified(job.id))
