"""OpenAI chat completions wire models (docs/api.md §8) and their translation to one generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from serve.api.chat import Turn, refusal, render, reserved_in
from serve.api.openai.errors import invalid
from serve.api.translate import generation_request
from serve.engine.types import Completion, GenerationRequest
from serve.media.intake import SCHEMES, scheme

MAX_IMAGES = 1  # LLaVA-1.5 takes one image per prompt
MAX_STOP = 4  # OpenAI's bound on stop sequences
_INT64 = 2**63


class _Wire(BaseModel):
    # OpenAI's API is strictly typed ("0.5" is not a number) and NaN is not JSON; fields it defines that
    # change nothing here (user, metadata, store, ...) and fields newer SDKs add are ignored.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


class ImageURL(_Wire):
    url: str = Field(description="http(s) URL or data: URI of the image.")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="Accepted and ignored (one size).")


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ImagePart(_Wire):
    type: Literal["image_url"]
    image_url: ImageURL


def _tag(prefix: str, value: Any) -> str | None:
    """The tag of a union member: "~" marks it, so it can be dropped from an error's `param`."""
    if isinstance(value, dict):
        return f"~{value.get(prefix)}"
    return None


def _content_kind(value: Any) -> str | None:
    return "~str" if isinstance(value, str) else "~list" if isinstance(value, list) else None


Part = Annotated[
    Annotated[TextPart, Tag("~text")] | Annotated[ImagePart, Tag("~image_url")],
    Discriminator(lambda v: _tag("type", v), custom_error_type="invalid_part",
                  custom_error_message="A content part must have type 'text' or 'image_url'."),
]
Content = Annotated[
    Annotated[str, Tag("~str")] | Annotated[list[Part], Tag("~list")],
    Discriminator(_content_kind, custom_error_type="invalid_content",
                  custom_error_message="Content must be a string or a list of content parts."),
]


_StopString = Annotated[str, Field(min_length=1)]  # vLLM refuses an empty stop string
Stop = Annotated[
    Annotated[_StopString, Tag("~str")] | Annotated[list[_StopString], Tag("~list"), Field(max_length=MAX_STOP)],
    Discriminator(_content_kind, custom_error_type="invalid_stop",
                  custom_error_message=f"stop must be a string or a list of up to {MAX_STOP} strings."),
]


class Message(_Wire):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: Content
    name: str | None = Field(None, description="Accepted and ignored (the template has no names).")


class StreamOptions(_Wire):
    include_usage: bool = Field(False, description="Send a last chunk with the usage and no choices.")


class ChatRequest(_Wire):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    # null is every optional parameter's default, as in OpenAI's API (the SDKs send it for an explicit None).
    temperature: float | None = Field(None, ge=0, le=2, description="Default 1.")
    top_p: float | None = Field(None, ge=0, le=1, description="Default 1.")
    stop: Stop | None = None
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # OpenAI parameters this server cannot honour: refused unless at their neutral value (unsupported()).
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None

    def output_limit(self) -> tuple[int | None, str]:
        """(limit, its parameter): max_completion_tokens wins, as in OpenAI's API."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


def check(req: ChatRequest, max_model_len: int) -> None:
    """What the schema cannot say: refused parameters, the stream_options rule, the context bound."""
    if name := unsupported(req):
        why = "must be 1: one choice per request" if name == "n" else "is not supported by this server; leave it unset"
        raise invalid(f"'{name}' {why} (LLaVA-1.5 chat completions).", name)
    if req.stream_options is not None and not req.stream:
        raise invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
    limit, name = req.output_limit()
    if limit is not None and limit > max_model_len:
        raise invalid(f"'{name}' is too large: the model's context is {max_model_len} tokens.", name)


def unsupported(req: ChatRequest) -> str | None:
    """The first parameter set to something this server cannot do, or None."""
    neutral = {
        "n": req.n in (None, 1), "logprobs": not req.logprobs, "top_logprobs": req.top_logprobs in (None, 0),
        "tools": not req.tools, "tool_choice": req.tool_choice in (None, "none"), "functions": not req.functions,
        "function_call": req.function_call in (None, "none"),
        "response_format": req.response_format in (None, {"type": "text"}),
        "frequency_penalty": not req.frequency_penalty, "presence_penalty": not req.presence_penalty,
        "logit_bias": not req.logit_bias, "audio": req.audio is None,
        "modalities": req.modalities in (None, ["text"]), "prediction": req.prediction is None,
    }
    return next((name for name, ok in neutral.items() if not ok), None)


@dataclass(frozen=True)
class Conversation:
    """What a chat request asks of the model: the rendered prompt and its one image, if any."""

    prompt: str
    image_url: str | None
    image_param: str | None  # where the image is in the request, for its error


def conversation(req: ChatRequest) -> Conversation:
    """The messages as LLaVA-1.5's prompt; refuses what the model cannot take (docs/api.md §8.2)."""
    turns, image_url, image_param = [], None, None
    for i, msg in enumerate(req.messages):
        if msg.role in ("system", "developer") and i > 0:
            raise invalid(f"A {msg.role} message may only be the first message.", f"messages[{i}].role")
        parts = [TextPart(type="text", text=msg.content)] if isinstance(msg.content, str) else msg.content
        texts, images = [], 0
        for j, part in enumerate(parts):
            where = f"messages[{i}].content" + ("" if isinstance(msg.content, str) else f"[{j}]")
            if isinstance(part, ImagePart):
                if msg.role != "user":
                    raise invalid("Images are only allowed in user messages.", where)
                if image_url is not None:
                    raise invalid(f"At most {MAX_IMAGES} image may be provided in one request (LLaVA-1.5 "
                                  "takes one image per prompt).", where)
                image_url, image_param, images = part.image_url.url, f"{where}.image_url.url", 1
                if scheme(part.image_url.url) not in SCHEMES:
                    # Refused here, before the limits: a malformed request costs no quota.
                    raise invalid("image_url.url must be an http(s) URL or a data: URI.", image_param,
                                  "invalid_image_url")
            elif (marker := reserved_in(part.text)) is not None:
                raise invalid(refusal(marker), where)
            else:
                texts.append(part.text)
        turns.append(Turn(msg.role, tuple(texts), images))
    return Conversation(render(turns), image_url, image_param)


def to_generation_request(
    req: ChatRequest, conv: Conversation, *, request_id: str, owner: str, image
) -> GenerationRequest:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return generation_request(
        request_id=request_id, owner=owner, prompt=conv.prompt, image=image, max_tokens=req.output_limit()[0],
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, stream=bool(req.stream), stop=stop, seed=req.seed,
    )


# -- answers (docs/api.md §8.4, §8.5) ---------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What every chunk of one answer shares."""

    id: str
    created: int
    model: str

    def completion(self, text: str, done: Completion) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": done.finish_reason}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage(done)}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, *, with_usage: bool) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        if with_usage:
            body["usage"] = None  # OpenAI's chunks carry a null usage when the last one will have it
        return body

    def usage_chunk(self, done: Completion) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage(done)}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def usage(done: Completion) -> dict[str, int]:
    # The prompt's tokens include the image's (vLLM's count of the expanded prompt).
    return {"prompt_tokens": done.num_input_tokens, "completion_tokens": done.num_output_tokens,
            "total_tokens": done.num_input_tokens + done.num_output_tokens}


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "llava-serve"}
