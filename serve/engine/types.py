"""The one internal request type and the engine's stream items.

Both wire APIs translate into `GenerationRequest`; nothing downstream knows which API a request
came from. An engine stream is zero or more `TextDelta`s followed by exactly one `Completion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from PIL import Image


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str  # also the engine's request id, so logs line up end to end
    owner: str  # the caller's key *name*, never the key
    prompt: str  # already in the model's template
    image: Image.Image  # decoded, RGB, bounded size
    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    stream: bool = False  # False: the engine may deliver the text in one delta at the end


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


class Engine(Protocol):
    """What the ingress needs from the model side; vLLM in production, a fake in unit tests."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]: ...

    async def check_health(self) -> None: ...


async def collect(stream: AsyncIterator[StreamItem]) -> tuple[list[str], Completion]:
    """Drain a stream into its text chunks (joined, the answer) and the final counts."""
    parts: list[str] = []
    async for item in stream:
        if isinstance(item, TextDelta):
            parts.append(item.text)
        else:
            return parts, item
    raise EngineUnavailable("engine stream ended without a completion")
