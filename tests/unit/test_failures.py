"""Failure kinds have one owner: `classify` turns every exception into a kind, and each API's tables
cover every kind (no silent fallback), in that API's error shape."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from pydantic import BaseModel, ValidationError

from serve.api.eachlabs.errors import ANSWERS as EACHLABS_ANSWERS
from serve.api.eachlabs.errors import ERROR_CODES
from serve.api.errors import ApiError, answer
from serve.api.fal.errors import ANSWERS as FAL_ANSWERS
from serve.api.openai.errors import ANSWERS as OPENAI_ANSWERS
from serve.engine.types import EngineInputError, EngineUnavailable, StartTimeout
from serve.jobs.failures import INTERNAL_MESSAGE, classify
from serve.jobs.models import (
    Admission, BodyTooLarge, FailureKind, JobError, LimitExceeded, Problem, StoreUnavailable,
)
from serve.media.errors import ImageDownloadError, ImageLoadError

REFUSED = Admission(allowed=False, reason="rate", limit=60, max_concurrent=10, remaining=0, reset_s=12.0,
                    retry_after_s=12.0)


class _Model(BaseModel):
    n: int


def _validation_error() -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        _Model.model_validate({"n": "x"})
    return caught.value


EXAMPLES = {
    FailureKind.VALIDATION: _validation_error(),
    FailureKind.IMAGE_DOWNLOAD: ImageDownloadError("HTTP 404"),
    FailureKind.IMAGE_LOAD: ImageLoadError("not an image"),
    FailureKind.INPUT: EngineInputError("prompt too long"),
    FailureKind.LIMITED: LimitExceeded(REFUSED),
    FailureKind.TOO_LARGE: BodyTooLarge(1000),
    FailureKind.START_TIMEOUT: StartTimeout("late"),
    FailureKind.CANCELLED: asyncio.CancelledError(),
    FailureKind.UNAVAILABLE: EngineUnavailable("no replica"),
    FailureKind.STORE_UNAVAILABLE: StoreUnavailable("redis down"),
    FailureKind.WORKER_LOST: None,  # never raised: the store records it when a lease lapses too often
    FailureKind.INTERNAL: KeyError("bug"),
}


def test_every_kind_has_an_example():
    assert set(EXAMPLES) == set(FailureKind)


@pytest.mark.parametrize("kind", [k for k, exc in EXAMPLES.items() if exc is not None], ids=lambda k: k.value)
def test_classify_maps_each_exception_to_its_kind(kind):
    assert classify(EXAMPLES[kind]).kind == kind


def test_validation_keeps_each_problem_and_limits_keep_the_decision():
    err = classify(EXAMPLES[FailureKind.VALIDATION])
    assert err.problems == [Problem(loc=["n"], msg=err.problems[0].msg, type="int_parsing", input="x")]
    assert classify(EXAMPLES[FailureKind.LIMITED]).admission == REFUSED


def test_unavailability_says_no_internals():
    engine = classify(EngineUnavailable("no engine replica could serve the request: ActorDiedError"))
    store = classify(StoreUnavailable("Redis job store unavailable: ConnectionError: 10.0.0.7:6379"))
    assert "Actor" not in engine.message and "10.0.0.7" not in store.message
    assert engine.message.endswith("please retry.") and store.message.endswith("please retry.")


def test_an_unexpected_exception_is_internal_and_logged_once_without_reaching_the_message(caplog):
    caplog.set_level(logging.ERROR, logger="serve.jobs.failures")
    err = classify(RuntimeError("/secret/path.py line 3"))
    assert err == JobError(kind=FailureKind.INTERNAL, message=INTERNAL_MESSAGE)
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None


TABLES = {"fal": (FAL_ANSWERS, "detail"), "eachlabs": (EACHLABS_ANSWERS, "error"), "openai": (OPENAI_ANSWERS, "error")}


@pytest.mark.parametrize("api", TABLES)
def test_each_api_table_covers_every_kind_in_its_shape(api):
    answers, key = TABLES[api]
    assert set(answers) == set(FailureKind), f"{api} has no answer for {set(FailureKind) - set(answers)}"
    for kind in FailureKind:
        exc = EXAMPLES[kind]
        error = classify(exc) if exc is not None else JobError(kind=kind, message="Worker lost.")
        got = answers[kind](error, {"image_url": "https://example.com/a.png", "prompt": "hi"})
        assert isinstance(got, ApiError) and key in got.body, (api, kind)
        assert 400 <= got.status_code < 600
        # Only a bug is a 500; a refusal is a 429 carrying when to retry.
        assert (got.status_code == 500) == (kind == FailureKind.INTERNAL), (api, kind, got.status_code)
        if kind == FailureKind.LIMITED:
            assert got.status_code == 429 and got.headers["Retry-After"] == "12"
        if kind == FailureKind.TOO_LARGE:
            assert got.status_code == 413 and "1000 bytes" in json.dumps(got.body)


def test_eachlabs_error_codes_cover_every_kind():
    assert set(ERROR_CODES) == set(FailureKind)


def test_answer_passes_an_api_error_through_and_classifies_the_rest():
    mine = ApiError(418, {"detail": "teapot"})
    assert answer(FAL_ANSWERS, mine) is mine
    got = answer(FAL_ANSWERS, ImageDownloadError("HTTP 404"), {"image_url": "https://x.test/a.png"})
    assert got.status_code == 422
    assert got.body["detail"][0]["loc"] == ["body", "image_url"]
    assert got.body["detail"][0]["input"] == "https://x.test/a.png"
    assert got.body["detail"][0]["type"] == "file_download_error"
