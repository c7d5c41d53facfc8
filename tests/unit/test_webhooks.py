"""Webhook delivery: bounded retries, 2xx acknowledges, SSRF guard, never blocking the caller."""

import asyncio
import time

import pytest

from serve.api.eachlabs.serving import webhook_payload
from serve.config import MediaConfig, WebhooksConfig
from serve.jobs.models import Job, JobError, JobResult, JobStatus
from serve.webhooks import WebhookSender
from tests.conftest import Receiver


@pytest.fixture
def receiver_factory():
    made = []

    def make(statuses, delay=0.0):
        made.append(Receiver(statuses, delay))
        return made[-1]

    yield make
    for r in made:
        r.close()


def sender(allow=("127.0.0.1/32",), attempts=3):
    cfg = WebhooksConfig(attempts=attempts, backoff_s=0.0, timeout_s=2.0)
    return WebhookSender(MediaConfig(allow_networks=list(allow)), cfg)


def test_delivered_with_payload_and_secret(receiver_factory):
    rx = receiver_factory([204])
    ok = asyncio.run(sender().deliver(rx.url, {"exec_id": "x", "status": "succeeded"}, {"X-Webhook-Secret": "s3"}))
    assert ok and len(rx.calls) == 1
    body, headers = rx.calls[0]
    assert body == {"exec_id": "x", "status": "succeeded"}
    assert headers["X-Webhook-Secret"] == "s3" and headers["Content-Type"] == "application/json"


def test_retries_until_acknowledged_then_gives_up(receiver_factory):
    flaky = receiver_factory([500, 503, 200])
    assert asyncio.run(sender().deliver(flaky.url, {}, {})) and len(flaky.calls) == 3
    down = receiver_factory([500])
    assert not asyncio.run(sender(attempts=3).deliver(down.url, {}, {})) and len(down.calls) == 3


def test_waits_double_up_to_the_cap(receiver_factory, monkeypatch):
    import serve.webhooks

    waits, real_sleep = [], asyncio.sleep

    async def sleep(seconds):
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(serve.webhooks.asyncio, "sleep", sleep)
    down = receiver_factory([503])
    cfg = WebhooksConfig(attempts=5, backoff_s=2.0, max_backoff_s=5.0, timeout_s=2.0)
    assert not asyncio.run(WebhookSender(MediaConfig(allow_networks=["127.0.0.1/32"]), cfg).deliver(down.url, {}, {}))
    assert waits == [2.0, 4.0, 5.0, 5.0] and len(down.calls) == 5


def test_a_delivery_cut_short_by_close_is_handed_over(receiver_factory):
    down, fine = receiver_factory([503]), receiver_factory([200])
    handed = []

    async def main():
        cfg = WebhooksConfig(attempts=5, backoff_s=30.0, timeout_s=2.0)  # stuck waiting to retry
        s = WebhookSender(MediaConfig(allow_networks=["127.0.0.1/32"]), cfg)

        async def handover(name):
            handed.append(name)

        s.send(down.url, {"n": 1}, on_abandon=lambda: handover("down"))
        s.send(fine.url, {"n": 2}, on_abandon=lambda: handover("fine"))
        await asyncio.sleep(0.5)
        await s.aclose()

    asyncio.run(main())
    assert handed == ["down"]  # the acknowledged one is done; only the unfinished one goes back
    assert len(down.calls) == 1 and len(fine.calls) == 1


@pytest.mark.parametrize("url", ["http://10.0.0.5/hook", "http://169.254.169.254/latest", "ftp://example.com/x"])
def test_refused_targets_are_never_contacted(url):
    # IP literals and bad schemes are refused before any connection; nothing to retry.
    assert not asyncio.run(sender(allow=()).deliver(url, {}, {}))


def test_loopback_needs_the_allow_list(receiver_factory):
    rx = receiver_factory([200])
    assert not asyncio.run(sender(allow=()).deliver(rx.url, {}, {}))
    assert rx.calls == []


def test_send_does_not_block(receiver_factory):
    rx = receiver_factory([200], delay=0.5)

    async def main():
        s = sender()
        t0 = time.perf_counter()
        s.send(rx.url, {"n": 1})
        returned = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        await s.aclose()
        return returned

    assert asyncio.run(main()) < 0.05
    assert len(rx.calls) == 1


def job(status, **kw):
    return Job(id="p1", owner="o", api="eachlabs", input={}, max_concurrent=1, created_at=0.0, status=status, **kw)


def test_eachlabs_payloads():
    ok = job(JobStatus.SUCCEEDED, result=JobResult(chunks=["a", "b"], num_input_tokens=1, num_output_tokens=2,
                                                   finish_reason="length"))
    assert webhook_payload(ok) == {"exec_id": "p1", "flow_id": None, "status": "succeeded", "output": ["a", "b"],
                                   "error": ""}
    failed = webhook_payload(job(JobStatus.FAILED, error=JobError(kind="image_download", message="unreachable")))
    assert failed["status"] == "failed"
    assert failed["output"][0]["error"] == {"error_code": "INPUT_DOWNLOAD_ERROR", "error_message": "unreachable"}
    assert webhook_payload(job(JobStatus.CANCELLED, error=JobError(kind="cancelled", message="Cancelled."))) is None
