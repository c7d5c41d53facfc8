"""The one internal request type and the engine's stream items.

Every wire API translates into `GenerationRequest`; nothing downstream knows which API a request
came from. An engine stream is zero or more `TextDelta`s followed by exactly one `Completion`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Protocol

from PIL import Image


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str  # also the engine's request id, so logs line up end to end
    owner: str  # the caller's key *name*, never the key
    prompt: str  # already in the model's template, one image placeholder per image
    image: Image.Image | None  # decoded, RGB, bounded size; None for a text-only prompt
    max_tokens: int | None  # None: up to the end of the context
    temperature: float  # 0 = greedy
    top_p: float
    stream: bool = False  # False: the engine may deliver the text in one delta at the end
    stop: tuple[str, ...] = ()  # generation ends before any of these (not included in the text)
    seed: int | None = None  # per-request sampling seed
    caller: Any = None  # the calling ingress replica's actor handle, set by HandleEngine: its death aborts this


@dataclass(frozen=True)
class TextDelta:
    text: str
    num_tokens: int  # a delta can carry several tokens when the consumer lags


@dataclass(frozen=True)
class Completion:
    num_input_tokens: int  # image tokens included
    num_output_tokens: int
    finish_reason: str  # "length" | "stop" | "abort"


StreamItem = TextDelta | Completion


class EngineInputError(ValueError):
    """The request cannot be served as sent (e.g. the prompt does not fit the context)."""


class EngineUnavailable(RuntimeError):
    """The engine is dead or unreachable; the request may succeed later or elsewhere."""


class EngineWaking(EngineUnavailable):
    """The engine rests at 0 replicas and did not start within the wait a sync request gets: retry after
    `retry_after_s` (docs/autoscaling.md)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StartTimeout(Exception):
    """The request did not start generating before the caller's start deadline."""


class Engine(Protocol):
    """What the ingress needs from the model side; vLLM in production, a fake in unit tests."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]: ...

    async def check_health(self) -> None: ...


class ServedEngine(Engine, Protocol):
    """What the engine deployment (serve.engine.server.LLMServer) runs: an Engine it can also ask for
    its counters and shut down."""

    def stats(self) -> dict[str, int]: ...

    def shutdown(self) -> None: ...


async def collect(stream: AsyncIterator[StreamItem]) -> tuple[list[str], Completion]:
    """Drain a stream into its text chunks (joined, the answer) and the final counts."""
    parts: list[str] = []
    async for item in stream:
        if isinstance(item, TextDelta):
            parts.append(item.text)
        else:
            return parts, item
    raise EngineUnavailable("engine stream ended without a completion")


async def started(
    stream: AsyncGenerator[StreamItem, None], timeout_s: float | None = None
) -> AsyncGenerator[StreamItem, None]:
    """Wait for the stream's first item (at most `timeout_s`; the stream is then closed, which aborts
    the request) and return the whole stream: failures before the first token surface here, where a
    caller can still answer with an HTTP error instead of a broken stream."""
    try:
        first = await asyncio.wait_for(anext(stream), timeout_s)
    except TimeoutError:
        await stream.aclose()
        raise StartTimeout(f"generation did not start within {timeout_s:g} s") from None
    except StopAsyncIteration:
        raise EngineUnavailable("engine stream ended without a completion") from None

    async def whole() -> AsyncGenerator[StreamItem, None]:
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()  # closing the whole closes the engine stream (aborts the request)

    return whole()


async def coalesce(
    stream: AsyncIterator[StreamItem], interval_s: float, clock: Callable[[], float] = time.monotonic
) -> AsyncGenerator[StreamItem, None]:
    """The stream with text deltas merged so that at most one leaves per `interval_s`: the first at once
    (time to first token is untouched); a later one that comes sooner is held and leaves merged with the
    first delta arriving once the interval has passed, or just before the completion. Every delta that
    crosses a process boundary costs a Ray object and an SSE event; a fast engine (tokens every few ms)
    would pay that per token, while a GPU taking tens of ms per decode step never has a delta held."""
    pending: TextDelta | None = None
    sent_at: float | None = None
    try:
        async for item in stream:
            if isinstance(item, TextDelta):
                if pending is not None:
                    item = TextDelta(pending.text + item.text, pending.num_tokens + item.num_tokens)
                now = clock()
                if sent_at is None or now - sent_at >= interval_s:
                    pending, sent_at = None, now
                    yield item
                else:
                    pending = item
            else:
                if pending is not None:
                    yield pending
                    pending = None
                yield item
        if pending is not None:  # a stream that ends without a completion still delivers its text
            yield pending
    except Exception:
        if pending is not None:  # the text generated before a failure still reaches the caller
            yield pending
        raise
    finally:
        # Closed early (the caller is gone): close the engine stream now, which aborts the request,
        # rather than whenever the garbage collector gets to it.
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
