"""The store's conformance suite (tests/store_conformance.py) on the reference MemoryStore, in-process.
tests/integration/test_store_conformance.py runs the same suite on the Ray actor and Redis. Then what reads
show of a job's input (`abridge_long_strings`) and what it counts against the stored bytes."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.store_conformance")

from pydantic import TypeAdapter  # noqa: E402

from serve.jobs.memory import MemoryStore  # noqa: E402
from serve.jobs.models import abridge_long_strings, input_bytes  # noqa: E402
from serve.jobs.store import JobStore  # noqa: E402
from tests.store_conformance import TTL, StoreConformance  # noqa: E402


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def store(self, clock):
        return JobStore(MemoryStore(TTL, max_attempts=2), clock)


def test_abridging_cuts_every_long_string_and_keeps_the_rest():
    uri = "data:image/png;base64," + "A" * 25_000_000  # a 25 MB input: what a status poll must not copy
    value = {"image_url": uri, "prompt": "x" * 256, "n": 3, "flags": [True, None, 1.5],
             "nested": [{"k" * 300: "y" * 257}], "meta": {}}
    shown = abridge_long_strings(value)
    assert shown == {
        "image_url": uri[:64] + "\u2026 (25000022 characters)",
        "prompt": "x" * 256,  # 256 characters is not long
        "n": 3, "flags": [True, None, 1.5],
        "nested": [{"k" * 64 + "\u2026 (300 characters)": "y" * 64 + "\u2026 (257 characters)"}], "meta": {}}
    assert abridge_long_strings(shown) == shown  # reads may abridge what is already abridged
    assert len(TypeAdapter(dict).dump_json(shown)) < 1000  # from 25 MB
    assert value["image_url"] is uri  # the original is untouched (a claim hands it to the runner)


def test_characters_not_bytes_are_counted_and_cut():
    text = "\U0001f999" * 300  # 4 bytes each in UTF-8
    assert abridge_long_strings(text) == "\U0001f999" * 64 + "\u2026 (300 characters)"
    assert input_bytes({"t": text}) == len('{"t":""}') + 4 * 300
