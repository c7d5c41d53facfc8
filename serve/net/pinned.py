"""Requests to caller-supplied URLs, sent to the address the SSRF guard checked (serve/net/guard.py)."""

from __future__ import annotations

import ssl

import httpx

from serve.net.guard import AddressGuard

DEFAULT_PORTS = {"http": 80, "https": 443}


def pinned_client(timeout: httpx.Timeout | float, verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """A client fit for `send_pinned`."""
    return httpx.AsyncClient(
        # Environment proxies or .netrc would send the request somewhere the guard never checked.
        trust_env=False,
        verify=verify,
        timeout=timeout,
        # The pool is keyed by IP, but TLS is authenticated per hostname (SNI): a kept-alive
        # connection could serve another hostname at the same IP unauthenticated.
        limits=httpx.Limits(max_keepalive_connections=0),
    )


async def send_pinned(
    client: httpx.AsyncClient, guard: AddressGuard, method: str, url: httpx.URL, *, headers: dict[str, str],
    stream: bool = False, **request: object,
) -> httpx.Response:
    """Send to the address the guard just checked for `url`'s host (no second DNS answer can
    differ); the server still sees the real hostname in Host and in TLS SNI, against which its
    certificate is verified."""
    host = url.raw_host.decode("ascii")
    address = await guard.address_for(host, url.port or DEFAULT_PORTS[url.scheme])
    built = client.build_request(
        method,
        url.copy_with(host=address),
        headers={**headers, "Host": url.netloc.decode("ascii")},
        extensions={"sni_hostname": host} if url.scheme == "https" else {},
        **request,
    )
    return await client.send(built, stream=stream)


def url_problem(url: httpx.URL) -> str | None:
    """What makes `url` unusable as an image source or webhook, or None."""
    if url.scheme not in DEFAULT_PORTS:
        return "is not an http(s) URL"
    if not url.raw_host:
        return "has no host"
    if url.port is not None and not 0 < url.port < 65536:
        return "has a port outside 1-65535"
    return None
