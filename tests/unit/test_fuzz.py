"""A property-based fuzz of the whole wire against the in-process app with a fake engine: the requests and the
checks are tests/wire_fuzz.py's (the live stack gets the same: tests/hostile/test_fuzz_live.py). Findings become
cases of tests/unit/test_wire_corpus.py.

Deterministic (derandomize) and bounded: MAX_EXAMPLES requests in all, within seconds on two cores.
`pytest -s` prints what was sent and answered.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from serve.api.eachlabs.serving import EachlabsExecutor
from serve.api.fal.serving import FalExecutor
from serve.api.services import Services
from serve.config import JobsConfig, ReadsConfig
from serve.engine.types import Completion, TextDelta
from serve.ingress import create_app
from serve.jobs.runner import JobRunner
from tests.fakes import FakeEngine, make_services
from tests.wire_fuzz import fuzz_wire

MAX_EXAMPLES = 200
FAL_KEY = "fuzz-fal-key-1"
FAST = JobsConfig(lease_s=3.0, outage_after_s=1.0, runner_retry_s=0.01, reap_interval_s=0.1)


class ShortFake(FakeEngine):
    """The fake, answering a few tokens whatever max_tokens says (Eachlabs' has no upper bound)."""

    async def generate(self, request):
        self.requests.append(request)
        for i in range(min(request.max_tokens or 3, 3)):
            yield TextDelta(text=f"w{i} ", num_tokens=1)
        yield Completion(num_input_tokens=600, num_output_tokens=3, finish_reason="length")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    keys = tmp_path_factory.mktemp("fuzz") / "keys.yaml"
    keys.write_text(f"- {{key: {FAL_KEY}, name: fuzz, rate_per_minute: 100000, max_concurrent: 64}}\n")
    services = make_services(ShortFake(), keys)
    # Reads unbounded: the fuzz polls every job it got accepted as fast as it can.
    cfg = services.config.model_copy(update={"reads": ReadsConfig(per_second=1e6, burst=1_000_000)})
    services = Services.build(cfg, services.engine, services.store)
    executors = {"fal": FalExecutor(services), "eachlabs": EachlabsExecutor(services)}
    app = create_app(services, JobRunner(services.store, "runner-fuzz", executors, FAST))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client

PROBES = ("/metrics", "/readyz")


def test_every_answer_is_clean_and_in_shape(client):
    # /metrics and /readyz answer 503 for real here: no Ray to export through (docs/api.md §1.1).
    seen = fuzz_wire(client, FAL_KEY, MAX_EXAMPLES, unavailable_ok=PROBES)
    assert sum(n for k, n in seen.items() if k[1] == "job read back") > 0  # the fuzz reached jobs, not only errors
