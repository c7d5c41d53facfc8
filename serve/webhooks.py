"""Outbound webhooks: delivered in the background with bounded retries, never blocking the job.

A webhook URL is caller-supplied, so it passes the same SSRF guard as image URLs (the media
allow-lists apply) and the request goes to the address that was checked. A receiver is untrusted too:
each attempt has one deadline for all of it, at most `max_response_bytes` of its answer are read (only the
status counts), and at most `max_concurrent` attempts are in flight per replica (docs/bounds.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import httpx

from serve.config import MediaConfig, WebhooksConfig
from serve.net.bounded import read_bounded
from serve.net.guard import AddressGuard, AddressRefused, Resolver, system_resolver
from serve.net.pinned import pinned_client, send_pinned, url_problem

log = logging.getLogger(__name__)


class _Enough(Exception):
    """The receiver's answer is longer than what is read of it."""


class WebhookSender:
    def __init__(self, media: MediaConfig, cfg: WebhooksConfig, resolve: Resolver = system_resolver):
        self._guard = AddressGuard(media.allow_networks, media.allow_hosts, resolve)
        self._cfg = cfg
        self._client: httpx.AsyncClient | None = None
        self._slots = asyncio.Semaphore(cfg.max_concurrent)  # FIFO: a waiting attempt keeps its place
        # Running deliveries (held so they are not collected) and what to do if one is cut short.
        self._pending: dict[asyncio.Task, Callable[[], Awaitable[None]] | None] = {}

    def send(
        self, url: str, payload: dict[str, Any], headers: dict[str, str] | None = None,
        on_abandon: Callable[[], Awaitable[None]] | None = None,
        on_end: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Deliver in the background. `on_end` runs once the delivery is over (acknowledged or given up);
        `on_abandon` if the sender closes before that (the replica is stopping): it hands the delivery to
        someone who can finish it."""
        async def delivery() -> None:
            await self.deliver(url, payload, headers or {})
            if on_end is not None:
                try:
                    await on_end()
                except Exception as exc:  # the store is away: the delivery is offered again when its lease ends
                    log.warning("webhook %s: could not record that the delivery is over (%s); it may be sent "
                                "again", url, type(exc).__name__)

        task = asyncio.get_running_loop().create_task(delivery())
        self._pending[task] = on_abandon
        task.add_done_callback(lambda t: self._pending.pop(t, None))

    async def deliver(self, url: str, payload: dict[str, Any], headers: dict[str, str]) -> bool:
        """POST until a 2xx, at most `attempts` times with doubling waits; True when acknowledged."""
        try:
            target = httpx.URL(url)
            problem = url_problem(target)
        except httpx.InvalidURL:
            problem = "is not a valid URL"
        if problem:  # no attempt can succeed
            log.warning("webhook %s %s; not sent", url, problem)
            return False
        if self._client is None:
            self._client = pinned_client(self._cfg.timeout_s)
        wait = self._cfg.backoff_s
        for attempt in range(1, self._cfg.attempts + 1):
            try:
                async with self._slots:  # held for the attempt only, not for the wait before the next
                    status = await self._attempt(target, payload, headers)
                if 200 <= status < 300:
                    return True
                log.info("webhook %s answered %d (attempt %d)", url, status, attempt)
            except AddressRefused as exc:  # refused by the SSRF guard, or unresolvable: retrying will not help
                log.warning("webhook %s not sent: %s", url, exc)
                return False
            except TimeoutError:
                log.info("webhook %s did not answer within %g s (attempt %d)", url, self._cfg.timeout_s, attempt)
            except httpx.HTTPError as exc:
                log.info("webhook %s failed: %s (attempt %d)", url, type(exc).__name__, attempt)
            if attempt < self._cfg.attempts:
                await asyncio.sleep(wait)
                wait = min(2 * wait, self._cfg.max_backoff_s)
        log.warning("webhook %s not acknowledged after %d attempts", url, self._cfg.attempts)
        return False

    async def _attempt(self, target: httpx.URL, payload: dict[str, Any], headers: dict[str, str]) -> int:
        """One POST; its answer's status. httpx's timeouts are per read, so a receiver sending a byte a second
        would never trip them: one deadline covers DNS, connecting, the headers and the body read."""
        status = 0
        try:
            async with asyncio.timeout(self._cfg.timeout_s):
                resp = await send_pinned(self._client, self._guard, "POST", target, json=payload, stream=True,
                                         headers={"Content-Type": "application/json", **headers})
                status = resp.status_code
                try:
                    # Read a little so that a receiver which answers in full sees its answer taken; never more.
                    cap = self._cfg.max_response_bytes
                    await read_bounded(resp.aiter_raw(), cap, resp.headers.get("content-length", ""), _Enough)
                except (_Enough, httpx.HTTPError):
                    pass  # the status is all that counts
                finally:
                    await resp.aclose()
        except TimeoutError:
            if not status:
                raise
        return status  # the answer came, only its body was too slow

    async def aclose(self) -> None:
        cut_short = [(task, handover) for task, handover in self._pending.items() if not task.done()]
        for task, _ in cut_short:
            task.cancel()
        await asyncio.gather(*(task for task, _ in cut_short), return_exceptions=True)
        for _, handover in cut_short:
            if handover is not None:
                try:
                    await handover()
                except Exception:  # the store is gone too: nothing more to do here
                    log.exception("webhook: could not hand an unfinished delivery over")
        if self._client is not None:
            await self._client.aclose()
