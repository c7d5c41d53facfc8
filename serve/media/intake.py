"""Image intake: every image reaches the engine through `ImageIntake.load`.

`data:` URIs (datauri.py) and http(s) URLs behind the SSRF guard (fetch.py, serve/net/) become
bytes; decode.py turns bytes into a bounded RGB image; cache.py remembers recent decodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

from PIL import Image

from serve.config import MediaConfig
from serve.media.cache import ImageCache
from serve.media.datauri import decode_data_uri
from serve.media.decode import decode_image
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

    async def load(self, url: str) -> Image.Image:
        """The image `url` refers to, RGB and bounded; raises `MediaError` for anything unusable."""
        url, kind = url.strip(), scheme(url)
        started = time.monotonic()
        # Payload and pixel decoding are CPU work: one worker-thread hop, off the event loop.
        if kind == "data":
            image, size = await asyncio.to_thread(self._decode_data_uri, url)
        elif kind in ("http", "https"):
            data = await self._fetcher.fetch(url)
            image, size = await asyncio.to_thread(self._decode, data), len(data)
        else:
            raise ImageLoadError("image_url must be an http(s) URL or a data: URI.")
        metrics().image(kind if kind == "data" else "url", time.monotonic() - started, size)
        return image

    def _decode_data_uri(self, url: str) -> tuple[Image.Image, int]:
        data = decode_data_uri(url, self._cfg.max_image_bytes)
        return self._decode(data), len(data)

    def _decode(self, data: bytes) -> Image.Image:
        if self._cache is None:
            return decode_image(data, self._cfg)
        key = hashlib.sha256(data).digest()
        img = self._cache.get(key)
        if img is None:
            img = decode_image(data, self._cfg)
            self._cache.put(key, img)
        return img

    async def aclose(self) -> None:
        await self._fetcher.aclose()
