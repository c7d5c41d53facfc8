"""vLLM's AsyncLLM behind the small `Engine` interface.

Independent of Ray so it can be tested and reused on its own; `serve.engine.server` wraps it in a
Serve deployment.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator

from serve.config import ServeConfig
from serve.engine.types import (
    Completion,
    EngineInputError,
    EngineUnavailable,
    GenerationRequest,
    StreamItem,
    TextDelta,
)

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs


_TOO_LONG = re.compile(r"prompt \(length (\d+)\) (plus the number of requested output tokens .*?)?is longer than "
                       r"the maximum model length of (\d+)")


def refused(exc: Exception) -> EngineInputError:
    """vLLM's refusal of a request, in words for its sender: a prompt past the context says so plainly, without
    vLLM's advice to operators (raise max_model_len) or the rejected value (docs/api.md §2.7)."""
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    if (m := _TOO_LONG.search(text)) is not None:
        prompt, full, context = int(m.group(1)), m.group(2) is not None, int(m.group(3))
        return EngineInputError(
            f"The prompt is {prompt} tokens (any image included) and the model's context is {context} tokens: "
            + ("no room is left for the answer" if full else "it does not fit") + ". Shorten the prompt."
        )
    return EngineInputError(text)


def engine_arg_values(cfg: ServeConfig) -> dict[str, Any]:
    """The AsyncEngineArgs fields a config sets (loadtest/bench.py gives the same to `vllm serve`)."""
    e = cfg.engine
    explicit = {
        "model": cfg.model.source,
        "served_model_name": [cfg.model.served_name],
        "dtype": cfg.model.dtype,
        "max_model_len": e.max_model_len,
        "max_num_seqs": e.max_num_seqs,
        "kv_cache_dtype": e.kv_cache_dtype,
        "enforce_eager": e.enforce_eager,
        # LLaVA-1.5 takes exactly one image per prompt; bounding it sizes the encoder cache right.
        "limit_mm_per_prompt": {"image": 1},
        # Keep per-step stats on: they feed vLLM's own Prometheus metrics.
        "disable_log_stats": False,
    }
    optional = {
        "gpu_memory_utilization": e.gpu_memory_utilization,
        "kv_cache_memory_bytes": e.kv_cache_memory_bytes,
        "max_num_batched_tokens": e.max_num_batched_tokens,
    }
    explicit.update({k: v for k, v in optional.items() if v is not None})
    clash = sorted(set(e.extra_args) & set(explicit))
    if clash:
        raise ValueError(f"engine.extra_args repeats settings that have their own field: {clash}")
    return {**explicit, **e.extra_args}


def build_engine_args(cfg: ServeConfig) -> AsyncEngineArgs:
    """vLLM's engine arguments for a config. Constructing them validates names and types offline."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**engine_arg_values(cfg))


@dataclass
class EngineStats:
    running: int = 0  # requests inside the engine right now
    peak_running: int = 0  # most requests inside the engine at once since start
    finished: int = 0
    failed: int = 0
    aborted: int = 0  # cancelled before they finished (client gone, caller cancelled)


class VLLMEngine:
    def __init__(self, cfg: ServeConfig, stat_loggers: list | None = None):
        from vllm.v1.engine.async_llm import AsyncLLM

        self._engine = AsyncLLM.from_engine_args(build_engine_args(cfg), stat_loggers=stat_loggers)
        self._stats = EngineStats()

    def stats(self) -> dict[str, int]:
        return asdict(self._stats)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        try:  # vLLM validates the parameters here (an empty stop string, say): the request's fault, a 4xx
            params = SamplingParams(
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                stop=list(request.stop) or None,
                seed=request.seed,
                # Non-streaming callers get one item at the end: no per-token detokenised deltas to ship.
                output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
            )
        except VLLMClientError as exc:
            raise refused(exc) from None
        prompt: dict[str, Any] = {"prompt": request.prompt}
        if request.image is not None:
            prompt["multi_modal_data"] = {"image": request.image}
        num_input = num_output = 0
        outcome = "aborted"  # unless the stream finishes or fails below
        cut_short = False
        self._stats.running += 1
        self._stats.peak_running = max(self._stats.peak_running, self._stats.running)
        try:
            async for out in self._engine.generate(prompt, params, request_id=request.request_id):
                if out.prompt_token_ids is not None:
                    num_input = len(out.prompt_token_ids)  # includes the expanded image tokens
                choice = out.outputs[0]
                # Count token ids, not chunks: one delta may carry several tokens.
                new_tokens = len(choice.token_ids)
                num_output = num_output + new_tokens if request.stream else new_tokens
                if choice.text or new_tokens:
                    yield TextDelta(text=choice.text, num_tokens=new_tokens)
                if out.finished:
                    if choice.finish_reason == "abort":  # aborted from outside this call: no answer
                        cut_short = True
                        break
                    outcome = "finished"
                    yield Completion(num_input, num_output, choice.finish_reason or "stop")
        except VLLMClientError as exc:
            outcome = "failed"
            raise refused(exc) from None
        except EngineDeadError as exc:
            outcome = "failed"
            raise EngineUnavailable(f"engine is dead: {exc}") from None
        except Exception:  # not cancellation: vLLM's generate() aborts those on its way out
            outcome = "failed"
            raise
        finally:
            self._stats.running -= 1
            setattr(self._stats, outcome, getattr(self._stats, outcome) + 1)
        if cut_short:
            # A truncated answer must never pass for a complete one.
            raise EngineUnavailable("the engine aborted the request before it finished")

    async def check_health(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            await self._engine.check_health()
        except EngineDeadError as exc:
            raise EngineUnavailable(f"engine is dead: {exc}") from None

    def shutdown(self) -> None:
        self._engine.shutdown()

