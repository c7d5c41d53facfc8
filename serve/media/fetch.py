"""http(s) image download: SSRF-guarded, every redirect re-checked, deadline and byte cap."""

from __future__ import annotations

import asyncio
import ssl

import httpx

from serve.config import MediaConfig
from serve.media.errors import ImageDownloadError, ImageLoadError
from serve.net.bounded import read_bounded
from serve.net.guard import AddressGuard, AddressRefused, Resolver, system_resolver
from serve.net.pinned import pinned_client, send_pinned, url_problem

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Some image hosts refuse anonymous library user agents; say who is asking.
_HEADERS = {"User-Agent": "llava-serve-image-fetch", "Accept": "image/*,*/*;q=0.8", "Accept-Encoding": "identity"}


class Fetcher:
    def __init__(
        self,
        cfg: MediaConfig,
        *,
        resolve: Resolver = system_resolver,
        verify: ssl.SSLContext | bool = True,
    ):
        self._cfg = cfg
        self._guard = AddressGuard(cfg.allow_networks, cfg.allow_hosts, resolve)
        self._verify = verify
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        # Created lazily, inside the event loop that will use it.
        if self._client is None:
            self._client = pinned_client(
                httpx.Timeout(self._cfg.read_timeout_s, connect=self._cfg.connect_timeout_s), verify=self._verify
            )
        return self._client

    async def fetch(self, url: str) -> bytes:
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL:
            raise ImageLoadError("image_url is not a valid URL.") from None
        problem = url_problem(target)
        if problem:
            raise ImageLoadError(f"image_url {problem}; expected e.g. https://example.com/cat.jpg.")
        try:
            async with asyncio.timeout(self._cfg.fetch_timeout_s):
                return await self._follow(target)
        except TimeoutError:
            raise ImageDownloadError(
                f"Downloading the image took longer than {self._cfg.fetch_timeout_s:g} s. Host it somewhere "
                "faster or send it inline as a data: URI."
            ) from None
        except AddressRefused as exc:
            raise ImageDownloadError(_refused(exc)) from None
        except httpx.ConnectTimeout:
            raise ImageDownloadError("Timed out connecting to the image host; check that it is up.") from None
        except httpx.ReadTimeout:
            raise ImageDownloadError(
                f"The image host sent nothing for {self._cfg.read_timeout_s:g} s; check that it is up."
            ) from None
        except httpx.ConnectError as exc:
            raise ImageDownloadError(f"Could not connect to the image host ({str(exc)[:200]}).") from None
        except httpx.RemoteProtocolError:
            raise ImageDownloadError(
                "The image host closed the connection before the whole image arrived, or answered with "
                "malformed HTTP; try again or use another URL."
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ImageDownloadError(f"Downloading the image failed ({type(exc).__name__}).") from None

    async def _follow(self, url: httpx.URL) -> bytes:
        seen = {str(url)}
        for _ in range(self._cfg.max_redirects + 1):
            resp = await self._send(url)
            try:
                if resp.status_code not in _REDIRECTS:
                    return await self._body(resp)
                url = _redirect_target(url, resp)
            finally:
                await resp.aclose()
            if str(url) in seen:
                raise ImageDownloadError("The image URL redirects in a loop; link the image file directly.")
            seen.add(str(url))
        raise ImageDownloadError(
            f"The image URL redirected more than {self._cfg.max_redirects} times; link the image file directly."
        )

    async def _send(self, url: httpx.URL) -> httpx.Response:
        return await send_pinned(self._http(), self._guard, "GET", url, headers=_HEADERS, stream=True)

    async def _body(self, resp: httpx.Response) -> bytes:
        if resp.status_code != 200:
            raise ImageDownloadError(
                f"Fetching the image returned HTTP {resp.status_code}; check that the URL is public and "
                "points at the image itself."
            )
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # Raw bytes are counted against the cap; a compressed body could inflate far past it.
            raise ImageDownloadError(
                f"The image host sent the image compressed (Content-Encoding: {encoding}); serve it uncompressed."
            )
        limit = self._cfg.max_image_bytes
        return await read_bounded(resp.aiter_raw(), limit, resp.headers.get("content-length", ""),
                                  lambda: _too_large(limit))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _redirect_target(url: httpx.URL, resp: httpx.Response) -> httpx.URL:
    location = resp.headers.get("location")
    if not location:
        raise ImageDownloadError(f"The image URL answered HTTP {resp.status_code} without a Location to follow.")
    try:
        target = url.join(location)
    except httpx.InvalidURL:
        raise ImageDownloadError("The image URL redirected to an invalid URL.") from None
    problem = url_problem(target)
    if problem:
        raise ImageDownloadError(f"The image URL redirected to a URL that {problem}.")
    return target


def _too_large(limit: int) -> ImageDownloadError:
    return ImageDownloadError(f"The image is larger than the {limit} byte limit; send a smaller image.")


def _refused(exc: AddressRefused) -> str:
    if exc.unresolved:
        return f"The image host {exc.host!r} could not be resolved; check the URL."
    return (f"The image host {exc.host!r} points to a loopback, private, link-local or otherwise non-public "
            "address, which this server does not fetch from. Use a publicly reachable URL or "
            "send the image inline as a data: URI.")
