"""vLLM's refusals of a request reach its sender in plain words (docs/api.md §2.7): a prompt past the context
says how long it is and how long the context is, without vLLM's advice to operators."""

import pytest
from vllm.exceptions import VLLMValidationError

from serve.engine.vllm_engine import refused

ADVICE = ("Make sure that `max_model_len` is no smaller than the number of text tokens plus multimodal tokens. For "
          "image inputs, the number of image tokens depends on the number of images, and possibly their aspect "
          "ratios as well.")


@pytest.mark.parametrize("vllm_says, plain", [
    (f"The decoder prompt (length 5003) is longer than the maximum model length of 4096. {ADVICE}",
     "The prompt is 5003 tokens (any image included) and the model's context is 4096 tokens: it does not fit."),
    ("The decoder prompt (length 4096) plus the number of requested output tokens (at least 1) is longer than the "
     f"maximum model length of 4096. {ADVICE}",
     "The prompt is 4096 tokens (any image included) and the model's context is 4096 tokens: no room is left for "
     "the answer."),
])
def test_a_prompt_past_the_context_is_said_plainly(vllm_says, plain):
    text = str(refused(VLLMValidationError(vllm_says, parameter="prompt", value=123)))
    assert text == plain + " Shorten the prompt."
    assert "max_model_len" not in text and "123" not in text


def test_other_refusals_keep_vllms_words_without_the_rejected_value():
    err = refused(VLLMValidationError("stop strings may not be empty", parameter="stop", value="\x00" * 10))
    assert str(err) == "stop strings may not be empty"
