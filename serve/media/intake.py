"""Image intake: every image reaches the engine through `ImageIntake.load`.

Accepts `data:` URIs and http(s) URLs, with a download deadline and byte cap, and decodes with a
pixel cap checked before any pixel is decoded. (The SSRF guard and fast downscale come later.)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import urllib.parse

import httpx
from PIL import Image, UnidentifiedImageError

from serve.config import MediaConfig


class MediaError(ValueError):
    """An image that cannot be used; `message` is safe to show the caller."""


class ImageDownloadError(MediaError):
    """The URL could not be fetched (unreachable, error status, too slow, too large)."""


class ImageLoadError(MediaError):
    """The bytes are not a usable image, or the reference is malformed."""


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    header, sep, payload = uri[len("data:") :].partition(",")
    if not sep:
        raise ImageLoadError("Malformed data URI: expected 'data:[<mime>][;base64],<data>'.")
    is_b64 = header.split(";")[-1].strip().lower() == "base64"
    # Check the size before decoding: base64 decodes to 3/4 of its length.
    if (len(payload) * 3 // 4 if is_b64 else len(payload)) > max_bytes:
        raise ImageLoadError(f"Image data is larger than the {max_bytes} byte limit.")
    try:
        data = base64.b64decode(payload, validate=True) if is_b64 else urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise ImageLoadError("Malformed data URI: the base64 payload does not decode.") from None
    if len(data) > max_bytes:
        raise ImageLoadError(f"Image data is larger than the {max_bytes} byte limit.")
    return data


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        # Image.open reads only the header: refuse oversized images before decoding any pixel.
        if img.width * img.height > max_pixels:
            raise ImageLoadError(
                f"Image is {img.width}x{img.height} pixels, more than the {max_pixels} pixel limit."
            )
        img.load()
        return img.convert("RGB")
    except ImageLoadError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise ImageLoadError("The file is not a supported image (JPEG, PNG, WebP, GIF, BMP, ...).") from None
    except (OSError, SyntaxError, ValueError):
        raise ImageLoadError("The image file is truncated or corrupt.") from None


class ImageIntake:
    def __init__(self, cfg: MediaConfig):
        self._cfg = cfg
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        # Created lazily, inside the event loop that will use it.
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=True, max_redirects=5)
        return self._client

    async def load(self, url: str) -> Image.Image:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = decode_data_uri(url, self._cfg.max_image_bytes)
        elif scheme in ("http", "https"):
            data = await self._fetch(url)
        else:
            raise ImageLoadError("image_url must be an http(s) URL or a data: URI.")
        # Decoding is CPU work: keep it off the event loop.
        return await asyncio.to_thread(decode_image, data, self._cfg.max_image_pixels)

    async def _fetch(self, url: str) -> bytes:
        limit = self._cfg.max_image_bytes
        try:
            async with asyncio.timeout(self._cfg.fetch_timeout_s):
                async with self._http().stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise ImageDownloadError(f"Fetching the image returned HTTP {resp.status_code}.")
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > limit:
                        raise ImageDownloadError(f"The image is larger than the {limit} byte limit.")
                    chunks, size = [], 0
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            raise ImageDownloadError(f"The image is larger than the {limit} byte limit.")
                        chunks.append(chunk)
                    return b"".join(chunks)
        except TimeoutError:
            raise ImageDownloadError(
                f"Fetching the image took longer than {self._cfg.fetch_timeout_s:g} s."
            ) from None
        except httpx.InvalidURL:
            raise ImageLoadError("image_url is not a valid URL.") from None
        except httpx.HTTPError as exc:
            raise ImageDownloadError(f"Failed to download the image: {type(exc).__name__}.") from None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
