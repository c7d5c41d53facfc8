"""What a hostile webhook receiver can cost a replica: bytes read, time per attempt, connections at once."""

import asyncio
import json
import re

import httpx
import pytest

from serve.config import MediaConfig, WebhooksConfig
from serve.webhooks import WebhookSender

LOOPBACK = MediaConfig(allow_networks=["127.0.0.0/8"])
GUARD = 60  # s: only ends a test that would otherwise hang; no assertion is about time


class Hook:
    """A webhook receiver on 127.0.0.1: reads each request, then `answer(writer, hung_up)` until the
    client hangs up (`hung_up` is set) or the answer is done."""

    def __init__(self, answer):
        self.answer = answer
        self.bodies, self.open, self.most_open, self.written = [], 0, 0, 0
        self.release = asyncio.Event()  # for answers that wait for the test

    async def __aenter__(self):
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/hook"
        return self

    async def __aexit__(self, *exc):
        self._server.close()

    async def _handle(self, reader, writer):
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
            self.bodies.append(json.loads(await reader.readexactly(length)))
            eof = asyncio.ensure_future(reader.read())  # b"" once the client hangs up
            try:
                await self.answer(self, writer, eof)
            finally:
                eof.cancel()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up
        finally:
            self.open -= 1
            writer.close()


async def endless_200(hook, writer, hung_up):
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    chunk = b"x" * 65536
    while not hung_up.done():
        writer.write(chunk)
        await writer.drain()  # raises once the client has closed the connection
        hook.written += len(chunk)


async def status_a_byte_at_a_time(hook, writer, hung_up):
    # A status line that never ends, one byte every 0.2 s: no read ever waits as long as httpx's timeout.
    writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    while not hung_up.done():
        writer.write(b"a")
        await writer.drain()
        await asyncio.sleep(0.2)


async def body_a_byte_at_a_time(hook, writer, hung_up):
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
    while not hung_up.done():
        writer.write(b"a")
        await writer.drain()
        await asyncio.sleep(0.2)


async def held_until_released(hook, writer, hung_up):
    await asyncio.wait([asyncio.ensure_future(hook.release.wait()), hung_up], return_when=asyncio.FIRST_COMPLETED)
    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    await writer.drain()


def run(main):
    return asyncio.run(asyncio.wait_for(main(), GUARD))


def sender(**cfg):
    return WebhookSender(LOOPBACK, WebhooksConfig(**{"attempts": 1, "backoff_s": 0.0, "timeout_s": 10.0, **cfg}))


@pytest.fixture
def bytes_read(monkeypatch):
    """Bytes the client took of any answer's body: whatever reads a body reads it through aiter_raw."""
    counted = []
    real = httpx.Response.aiter_raw

    async def counting(self, chunk_size=None):
        async for chunk in real(self, chunk_size):
            counted.append(len(chunk))
            yield chunk

    monkeypatch.setattr(httpx.Response, "aiter_raw", counting)
    return counted


def test_an_endless_answer_is_acknowledged_and_never_buffered(bytes_read):
    async def main():
        async with Hook(endless_200) as hook:
            ok = await sender(max_response_bytes=4096).deliver(hook.url, {"n": 1}, {})
            while hook.open:  # the receiver notices the hang-up
                await asyncio.sleep(0.01)
            return ok, hook.written

    ok, written = run(main)
    assert ok
    assert sum(bytes_read) <= 4096 + 65536  # the cap plus at most one network read
    # What the receiver could push before the client hung up: kernel socket buffers, a few MiB at most.
    assert written < 32 * 1024 * 1024


def test_a_long_content_length_is_not_read_at_all(bytes_read):
    async def answer(hook, writer, hung_up):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 65536)
        await writer.drain()
        await hung_up

    async def main():
        async with Hook(answer) as hook:
            return await sender(max_response_bytes=4096).deliver(hook.url, {}, {})

    assert run(main) and sum(bytes_read) == 0


def test_a_status_line_sent_a_byte_at_a_time_ends_each_attempt_by_its_deadline():
    # httpx's own timeouts are per read: only the attempt's deadline can end this one. Without it the
    # test would hang (GUARD), not fail an assertion.
    async def main():
        async with Hook(status_a_byte_at_a_time) as hook:
            ok = await sender(attempts=2, timeout_s=1.0).deliver(hook.url, {"n": 1}, {})
            while hook.open:
                await asyncio.sleep(0.01)
            return ok, len(hook.bodies)

    ok, attempts = run(main)
    assert not ok and attempts == 2  # each attempt gave up; the delivery as a whole did too


def test_a_body_sent_a_byte_at_a_time_still_acknowledges_by_its_status():
    async def main():
        async with Hook(body_a_byte_at_a_time) as hook:
            return await sender(attempts=3, timeout_s=1.0).deliver(hook.url, {}, {}), len(hook.bodies)

    ok, attempts = run(main)
    assert ok and attempts == 1  # the 200 came: no second delivery for a receiver that was only slow to finish


def test_never_more_than_max_concurrent_connections_and_waiting_ones_keep_their_order():
    n = 3

    async def main():
        async with Hook(held_until_released) as hook:
            s = sender(max_concurrent=n)
            deliveries = [asyncio.ensure_future(s.deliver(hook.url, {"n": i}, {})) for i in range(n + 5)]
            while hook.open < n:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # room for any delivery the cap failed to hold back to connect
            held = hook.open
            hook.release.set()
            results = await asyncio.gather(*deliveries)
            await s.aclose()
            return held, hook.most_open, results, [b["n"] for b in hook.bodies]

    held, most_open, results, order = run(main)
    assert held == n and most_open == n
    assert all(results)
    assert order[n:] == list(range(n, n + 5))  # the waiting ones went in the order they came


def test_waiting_deliveries_are_handed_over_on_close():
    handed = []

    async def main():
        async with Hook(held_until_released) as hook:
            s = sender(max_concurrent=1)

            def handover(i):
                async def run_it():
                    handed.append(i)
                return run_it

            for i in range(3):
                s.send(hook.url, {"n": i}, on_abandon=handover(i))
            while hook.open < 1:
                await asyncio.sleep(0.01)
            await s.aclose()  # one in flight, two waiting for a place
            return len(hook.bodies)

    assert run(main) == 1
    assert sorted(handed) == [0, 1, 2]
