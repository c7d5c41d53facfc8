"""Reads have their own per-key budget (docs/bounds.md, "Reads"): polls, results and cancels of one key are
refused 429 in their API's shape past it, while its generation limits and other keys are untouched."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from serve.api.eachlabs.serving import EachlabsExecutor
from serve.api.fal.serving import FalExecutor
from serve.api.reads import ReadBudget
from serve.api.services import Services
from serve.config import JobsConfig, ReadsConfig
from serve.ingress import create_app
from serve.jobs.models import LimitExceeded
from serve.jobs.runner import JobRunner
from tests.conftest import LOCAL_KEY, Clock, data_uri
from tests.fakes import FakeEngine, SlowEngine, make_services

APP = "/fal-ai/llavav15-13b"
FAL = {"Authorization": f"Key {LOCAL_KEY}"}
EACH = {"X-API-Key": LOCAL_KEY}
OTHER = {"Authorization": "Key other-key-123"}


def keys(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"- {{key: {LOCAL_KEY}, name: dev}}\n- {{key: other-key-123, name: other}}\n")
    return path


def client(tmp_path, reads: ReadsConfig, engine=None) -> TestClient:
    services = make_services(engine or FakeEngine(), keys(tmp_path))
    services = Services.build(services.config.model_copy(update={"reads": reads}), services.engine, services.store)
    executors = {"fal": FalExecutor(services), "eachlabs": EachlabsExecutor(services)}
    runner = JobRunner(services.store, "runner-1", executors, JobsConfig(lease_s=3.0, outage_after_s=1.5, runner_retry_s=0.01))
    return TestClient(create_app(services, runner))


def test_the_bucket_spends_saves_up_and_says_when_to_retry():
    clock = Clock()
    budget = ReadBudget(ReadsConfig(per_second=2, burst=3), clock=clock)
    for _ in range(3):
        budget.take("a")
    with pytest.raises(LimitExceeded) as refused:
        budget.take("a")
    assert refused.value.admission.reason == "reads" and refused.value.admission.retry_after_s == pytest.approx(0.5)
    budget.take("b")  # another key's budget is its own
    clock.advance(0.5)
    budget.take("a")  # one read earned back
    with pytest.raises(LimitExceeded):
        budget.take("a")
    clock.advance(60)
    for _ in range(3):  # saved up to the burst, no more
        budget.take("a")
    with pytest.raises(LimitExceeded):
        budget.take("a")


def test_status_streams_are_capped_per_key_and_given_back():
    budget = ReadBudget(ReadsConfig(max_status_streams=2))
    with budget.status_stream("a"), budget.status_stream("a"):
        with pytest.raises(LimitExceeded) as refused:
            with budget.status_stream("a"):
                pass
        assert refused.value.admission.reason == "streams"
        with budget.status_stream("b"):
            pass
    with budget.status_stream("a"), budget.status_stream("a"):
        pass  # both given back


def test_fal_polls_past_the_budget_are_429_in_fals_shape_and_cost_no_generation_quota(tmp_path):
    with client(tmp_path, ReadsConfig(per_second=0.001, burst=3)) as c:
        rid = c.post(f"/queue{APP}", json={"prompt": "hi", "image_url": data_uri()}, headers=FAL).json()["request_id"]
        polls = [c.get(f"/queue{APP}/requests/{rid}/status", headers=FAL) for _ in range(3)]
        refused = c.get(f"/queue{APP}/requests/{rid}", headers=FAL)
        cancel = c.put(f"/queue{APP}/requests/{rid}/cancel", headers=FAL)
        other = c.get(f"/queue{APP}/requests/{rid}/status", headers=OTHER)  # another key: its own budget (404)
        again = c.post(f"/queue{APP}", json={"prompt": "hi", "image_url": data_uri()}, headers=FAL)
    assert all(p.status_code in (200, 202) for p in polls)
    for resp in (refused, cancel):
        assert resp.status_code == 429
        assert resp.json()["detail"].startswith("Too many status reads for this key")
        assert int(resp.headers["retry-after"]) >= 1 and "x-ratelimit-limit" not in resp.headers
        assert resp.headers["x-fal-request-id"] == rid
    assert other.status_code == 404
    assert again.status_code == 200  # submits spend the generation window, not the reads


def test_eachlabs_gets_past_the_budget_are_429_in_its_shape(tmp_path):
    with client(tmp_path, ReadsConfig(per_second=0.001, burst=2)) as c:
        created = c.post("/v1/prediction/", headers=EACH, json={
            "model": "llava-13b", "version": "0.0.1", "input": {"prompt": "hi", "image": data_uri()}})
        pid = created.json()["predictionID"]
        answers = [c.get(f"/v1/prediction/{pid}", headers=EACH) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[-1].json()["error"].startswith("Too many status reads for this key")
    assert "retry-after" in answers[-1].headers


def test_an_open_status_stream_holds_one_of_the_keys_streams_until_it_ends(tmp_path):
    with client(tmp_path, ReadsConfig(max_status_streams=1), engine=SlowEngine(delay=0.02)) as c:
        body = {"prompt": "hi", "image_url": data_uri(), "max_new_tokens": 30}
        first = c.post(f"/queue{APP}", json=body, headers=FAL).json()["request_id"]
        second = c.post(f"/queue{APP}", json=body, headers=FAL).json()["request_id"]
        with c.stream("GET", f"/queue{APP}/requests/{first}/status/stream", headers=FAL) as open_stream:
            assert open_stream.status_code == 200
            refused = c.get(f"/queue{APP}/requests/{second}/status/stream", headers=FAL)
            open_stream.read()  # to its COMPLETED event: the stream ends, and gives its place back
        after = c.get(f"/queue{APP}/requests/{second}/status/stream", headers=FAL)
    assert refused.status_code == 429
    assert refused.json()["detail"] == ("Too many open status streams for this key (limit 1). "
                                        "Close one, or poll the status.")
    assert after.status_code == 200 and b"COMPLETED" in after.content
