"""LLaVA-1.5's conversation template: messages -> the prompt text the engine tokenizes.

Every API renders through here (fal and Eachlabs as one user turn with the image), with the Jinja
template shipped beside this module, flattening content exactly as vLLM's chat renderer does for a
template that reads `content` as a string. So `vllm serve --chat-template serve/api/llava_v1.jinja`
turns the same messages into the same tokens (docs/api.md §8.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from serve.engine.types import EngineInputError

TEMPLATE_PATH = Path(__file__).with_name("llava_v1.jinja")
IMAGE_TOKEN = "<image>"  # LLaVA-1.5's image placeholder: vLLM expands it to the image's 576 tokens
# What the template writes between turns, and the tokenizer's own BOS/EOS (it parses them out of text): in a
# client's text each would forge an image or a turn, so text holding one is refused (docs/api.md §8.2).
RESERVED = (IMAGE_TOKEN, "USER:", "ASSISTANT:", "<s>", "</s>")


def reserved_in(text: str) -> str | None:
    """The first marker of LLaVA's prompt format in `text`, if any."""
    return next((marker for marker in RESERVED if marker in text), None)


def refusal(marker: str) -> str:
    if marker == IMAGE_TOKEN:  # it would stand for an image the request does not carry
        return f"The text may not contain the image placeholder {IMAGE_TOKEN}; images come only as image fields."
    return f"The text may not contain {marker!r}: LLaVA's prompt format uses it to mark turns."

Role = Literal["system", "developer", "user", "assistant"]  # developer: a system message by its newer name


@dataclass(frozen=True)
class Turn:
    role: Role
    texts: tuple[str, ...]
    images: int = 0  # how many images the message carries (the request holds their data)

    def content(self) -> str:
        # vLLM's flattening for a string template: one placeholder line per image ahead of the texts,
        # texts joined by newlines, wherever the image parts stood.
        for text in self.texts:
            if (marker := reserved_in(text)) is not None:
                raise EngineInputError(refusal(marker))
        text = "\n".join(self.texts)
        return "\n".join([IMAGE_TOKEN] * self.images + [text]) if self.images else text


@lru_cache(maxsize=1)
def _template():
    # The environment transformers (and so vLLM) renders chat templates in.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
    return env.from_string(TEMPLATE_PATH.read_text())


def render(turns: Sequence[Turn]) -> str:
    """The prompt for the model's next (assistant) turn."""
    messages = [{"role": t.role, "content": t.content()} for t in turns]
    return _template().render(messages=messages, add_generation_prompt=True)


def single_turn(prompt: str) -> str:
    """One user question about one image: the fal and Eachlabs prompts."""
    return render([Turn("user", (prompt,), 1)])
