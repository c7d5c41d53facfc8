"""fal `fal-ai/llavav15-13b` wire models (api-spec §2.1, §2.2) and their translation."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from serve.api.translate import generation_request
from serve.config import ModelConfig
from serve.engine.types import Completion, GenerationRequest

APP_ID = "fal-ai/llavav15-13b"
MAX_NEW_TOKENS = 2048


class FalInput(BaseModel):
    # fal apps are FastAPI models: unknown fields are ignored, numeric strings coerced (lax mode).
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(description="The question or instruction about the image.")
    image_url: str = Field(description="http(s) URL or data: URI of the image.")
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="Tokens to generate (default 64).")
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS, description="Alias of max_new_tokens used by older clients."
    )
    temperature: float = Field(0.2, ge=0, le=1, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, ge=0, le=1, description="Nucleus sampling mass.")

    def resolved_max_tokens(self) -> int:
        # max_new_tokens wins when both are present (api-spec §2.1).
        return self.max_new_tokens or self.max_tokens or 64


class FalStats(BaseModel):
    num_input_tokens: int
    num_output_tokens: int


class FalOutput(BaseModel):
    output: str
    partial: bool = False
    stats: FalStats | None = None


def to_generation_request(
    inp: FalInput, *, request_id: str, owner: str, image, model: ModelConfig, stream: bool = False
) -> GenerationRequest:
    return generation_request(
        request_id=request_id, owner=owner, model=model, prompt=inp.prompt, image=image,
        max_tokens=inp.resolved_max_tokens(), temperature=inp.temperature, top_p=inp.top_p, stream=stream,
    )


def to_output(text: str, done: Completion) -> FalOutput:
    return FalOutput(
        output=text,
        stats=FalStats(num_input_tokens=done.num_input_tokens, num_output_tokens=done.num_output_tokens),
    )
