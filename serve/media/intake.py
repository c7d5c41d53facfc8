"""Image intake: every image reaches the engine through `ImageIntake.load`.

`data:` URIs (datauri.py) and http(s) URLs behind the SSRF guard (fetch.py, serve/net/) become
bytes; decode.py checks their header, then turns them into a bounded RGB image, within this replica's
decode memory (budget.py); cache.py remembers recent decodes.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time

from PIL import Image

from serve.config import MediaConfig
from serve.media.budget import DecodeBudget
from serve.media.cache import ImageCache
from serve.media.datauri import decode_data_uri
from serve.media.decode import Opened, decode_opened, open_image
from serve.media.errors import ImageDownloadError, ImageLoadError, MediaError
from serve.media.fetch import Fetcher
from serve.telemetry.metrics import metrics

__all__ = ["SCHEMES", "ImageDownloadError", "ImageIntake", "ImageLoadError", "MediaError", "scheme"]


SCHEMES = ("data", "http", "https")  # what `ImageIntake.load` takes


def scheme(url: str) -> str:
    """An image reference's scheme, lowercased ("" when it has none)."""
    name, sep, _ = url.strip().partition(":")
    return name.lower() if sep else ""


class ImageIntake:
    def __init__(self, cfg: MediaConfig, *, fetcher: Fetcher | None = None):
        self._cfg = cfg
        self._fetcher = fetcher or Fetcher(cfg)
        self._cache = ImageCache(cfg.cache_max_bytes) if cfg.cache_max_bytes else None
        self.budget = DecodeBudget(cfg.decode_memory_bytes)  # this replica's decode memory (docs/bounds.md)

    async def load(self, url: str) -> Image.Image:
        """The image `url` refers to, RGB and bounded; raises `MediaError` for anything unusable."""
        url, kind = url.strip(), scheme(url)
        started = time.monotonic()
        # Payload decoding and the header checks are CPU work: one worker-thread hop, off the event loop;
        # the pixels are decoded on another, once the decode budget has room for them.
        if kind == "data":
            (found, key), size = await asyncio.to_thread(self._open_data_uri, url)
        elif kind in ("http", "https"):
            data = await self._fetcher.fetch(url)
            (found, key), size = await asyncio.to_thread(self._open, data), len(data)
        else:
            raise ImageLoadError("image_url must be an http(s) URL or a data: URI.")
        if isinstance(found, Opened):
            found = await self.budget.run(found.cost, functools.partial(self._decode, found, key))
        metrics().image(kind if kind == "data" else "url", time.monotonic() - started, size)
        return found

    def _open_data_uri(self, url: str) -> tuple[tuple[Image.Image | Opened, bytes | None], int]:
        data = decode_data_uri(url, self._cfg.max_image_bytes)
        return self._open(data), len(data)

    def _open(self, data: bytes) -> tuple[Image.Image | Opened, bytes | None]:
        """The cached decode of `data`, or its checked header and the key to cache its decode under."""
        if self._cache is None:
            return open_image(data, self._cfg), None
        key = hashlib.sha256(data).digest()
        cached = self._cache.get(key)
        return (open_image(data, self._cfg) if cached is None else cached), key

    def _decode(self, opened: Opened, key: bytes | None) -> Image.Image:
        img = decode_opened(opened, self._cfg)
        if self._cache is not None and key is not None:
            self._cache.put(key, img)
        return img

    async def aclose(self) -> None:
        await self._fetcher.aclose()
