"""Safe decode: encoded bytes -> an RGB image bounded for the engine, without decoding a bomb.

Order matters for speed: the pixel cap is checked on the header, JPEGs are decoded straight at a
reduced scale (`draft`), only the first frame of an animation is decoded, and the bounded downscale
runs before the EXIF rotation so each step touches as few pixels as possible.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import ExifTags, Image, UnidentifiedImageError

from serve.config import MOST_DECODE_BYTES_PER_PIXEL, MediaConfig
from serve.media.errors import ImageLoadError, MediaError

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)  # transparent pixels become white, as in vLLM's loader and most viewers

# EXIF orientation -> the transpose that displays the image upright.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# Pillow keeps every mode but 1, L, P and I;16 at 4 bytes a pixel, RGB included. Each step of the decode
# frees its input as soon as its output exists, so at most two images of the (drafted) size are alive at
# once: the decoded one and its conversion, or the RGB one and its rotation (docs/media.md, "Decode memory").
BYTES_PER_PIXEL = 4
COPIES = 2
# Held beyond that by two decoders, per pixel of the full-size image: libwebp decodes into buffers of its own
# that Pillow copies out (measured up to 10.3 bytes, lossless RGBA); a progressive JPEG keeps every DCT
# coefficient, 2 bytes per band (at most 4), until its last scan, even when drafted.
_WEBP_BYTES = 12
_COEFFICIENT_BYTES = 2
MOST_BYTES_PER_PIXEL = BYTES_PER_PIXEL * COPIES + max(_WEBP_BYTES, 4 * _COEFFICIENT_BYTES)
assert MOST_BYTES_PER_PIXEL == MOST_DECODE_BYTES_PER_PIXEL  # what the config checks its budget with


def decode_cost(img: Image.Image, full_size: tuple[int, int]) -> int:
    """The most bytes decoding `img` (opened, drafted if a JPEG) holds at once; at most `MOST_BYTES_PER_PIXEL`
    per pixel of `full_size`."""
    cost = img.width * img.height * BYTES_PER_PIXEL * COPIES
    full = full_size[0] * full_size[1]
    if img.format == "WEBP":
        cost += full * _WEBP_BYTES
    elif img.format == "JPEG" and img.info.get("progressive"):
        cost += full * _COEFFICIENT_BYTES * len(img.getbands())
    return cost


@dataclass(eq=False)  # compared by identity: comparing two by value would decode both
class Opened:
    """An image whose header passed every check; none of its pixels is decoded yet."""

    image: Image.Image
    full_size: tuple[int, int]  # before any draft: the geometry the processor must see
    box: tuple[float, ...] | None  # the original's extent in drafted pixels (JPEG), else None
    shrink: bool
    cost: int  # decode_cost


def decode_image(data: bytes, cfg: MediaConfig) -> Image.Image:
    """Decode untrusted bytes; any failure is an `ImageLoadError` with a message for the caller."""
    return decode_opened(open_image(data, cfg), cfg)


def open_image(data: bytes, cfg: MediaConfig) -> Opened:
    """Read only the header and refuse, before any pixel is decoded, what cannot be served."""
    with _caller_errors(cfg):
        return _open(data, cfg)


def decode_opened(opened: Opened, cfg: MediaConfig) -> Image.Image:
    """The pixels of an opened image, RGB and bounded; holds at most `opened.cost` bytes at once."""
    with _caller_errors(cfg):
        return _decode(opened, cfg)


@contextlib.contextmanager
def _caller_errors(cfg: MediaConfig) -> Iterator[None]:
    try:
        yield
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise _too_many_pixels(cfg.max_image_pixels) from None
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"The data is not an image in a supported format ({', '.join(cfg.formats)}); send one of those."
        ) from None
    except Exception as exc:
        # Hostile bytes drive a large parser that raises many exception types: whatever it raises is
        # the file's fault and must be a 422, never a 500.
        log.info("image decode failed: %s: %s", type(exc).__name__, exc)
        raise ImageLoadError(
            "The image file is truncated or corrupt; re-encode it (e.g. as PNG or JPEG) and try again."
        ) from None


def _open(data: bytes, cfg: MediaConfig) -> Opened:
    img = Image.open(io.BytesIO(data), formats=cfg.formats)
    # Image.open reads only the header: refuse oversized images before decoding any pixel.
    if img.width * img.height > cfg.max_image_pixels:
        raise _too_many_pixels(cfg.max_image_pixels, img.size)
    _check_aspect_ratio(img.size, cfg.max_aspect_ratio)
    full_size, edge = img.size, cfg.downscale_short_edge
    shrink = edge is not None and min(full_size) > edge
    box = None
    if shrink:
        # JPEG only (None elsewhere): decode at the smallest 1/2, 1/4 or 1/8 scale still >= edge. The
        # box is the original's extent in decoded pixels: a last partial block must not stretch it.
        drafted = img.draft(img.mode, (edge, edge))
        box = drafted[1] if drafted else None
    cost = decode_cost(img, full_size)
    if cost > cfg.decode_memory_bytes:
        # Unreachable with a validated config (MediaConfig checks the pixel cap against the budget);
        # kept so that no image can wait forever for room that never comes.
        raise ImageLoadError(
            f"The image is {full_size[0]}x{full_size[1]} pixels, more than this server can decode at once; "
            "send a smaller image."
        )
    return Opened(img, full_size, box, shrink, cost)


def _check_aspect_ratio(size: tuple[int, int], limit: float) -> None:
    # The processor scales the short edge to 336 px: a 1x100000 image would become 336x33.6M pixels.
    w, h = size
    if max(w, h) > limit * min(w, h):
        raise ImageLoadError(
            f"The image is {w}x{h} pixels, one side more than {limit:g} times the other; the model sees "
            f"images scaled to a short side of 336 pixels, so crop or pad it to at most {limit:g}:1."
        )


def _decode(opened: Opened, cfg: MediaConfig) -> Image.Image:
    img = opened.image
    img.load()  # the first frame of an animation
    orientation = _orientation(img)
    rgb = _to_rgb(img)
    if opened.shrink:
        rgb = _consumed(rgb, _shrink(rgb, opened.full_size, opened.box, cfg.downscale_short_edge))
    if orientation in _ORIENTATION:
        rgb = _consumed(rgb, rgb.transpose(_ORIENTATION[orientation]))
    return rgb


def _consumed(source: Image.Image, result: Image.Image) -> Image.Image:
    """`result`, with `source`'s pixels freed now rather than when the last reference goes."""
    if result is not source:
        source.close()
    return result


def _shrink(img: Image.Image, full_size: tuple[int, int], box: tuple[float, ...] | None, edge: int) -> Image.Image:
    """Bring the shortest edge into [edge, 2 * edge) without changing the geometry the processor sees.

    When the sizes divide, an integer box reduction (each pixel the mean of k x k) keeps the aspect
    ratio exact, and it is the cheapest step; otherwise resample to exactly `bounded_size`.
    """
    w, h = img.size
    factor = min(w, h) // edge
    if (box is None or box == (0, 0, w, h)) and w % factor == 0 and h % factor == 0:
        return img.reduce(factor) if factor > 1 else img
    target = bounded_size(full_size, edge)
    # reducing_gap=1: a box reduction by the largest integer factor first (cheap), then one bicubic
    # step (CLIP's filter) of less than 2x; half the time of bicubic all the way.
    return img.resize(target, Image.Resampling.BICUBIC, box=box, reducing_gap=1.0)


def bounded_size(size: tuple[int, int], short_edge: int) -> tuple[int, int]:
    """`size` with the shortest edge reduced to `short_edge`, the long edge rounded down.

    With `short_edge` a multiple k of the processor's shortest_edge s, the processor's
    int(s * long' / short') = floor(floor(k*x)/k) = floor(x) = its int(s * long / short) on the
    original, x = s * long / short: the same resized size, so the centre crop is the same region.
    """
    w, h = size
    return (short_edge, h * short_edge // w) if w <= h else (w * short_edge // h, short_edge)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; alpha and palette transparency are composited over `BACKGROUND`.
    Consumes `img`: each step frees its input once its output exists (`COPIES`)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _wide_to_l(img)
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or "transparency" in img.info:
        if img.mode not in ("RGBA", "LA"):  # the two an RGB image can paste from directly
            img = _consumed(img, img.convert("RGBA"))
        # Pasting with the alpha band as mask is alpha_composite over an opaque background, exactly,
        # without the three full-size RGBA intermediates.
        out = Image.new("RGB", img.size, BACKGROUND)
        out.paste(img, mask=img)
        return _consumed(img, out)
    try:
        return _consumed(img, img.convert("RGB"))
    except ValueError:
        raise ImageLoadError(f"Images in colour mode {img.mode} are not supported; convert it to RGB.") from None


def _wide_to_l(img: Image.Image) -> Image.Image:
    # 16-bit data maps at full scale (65535 -> 255). 32-bit integer and float data have no standard
    # range, so their own min..max is stretched to 0..255 (a constant image keeps its value, clipped).
    if img.mode.startswith("I;16"):
        img, (lo, hi) = _consumed(img, img.convert("I")), (0, 65535)
    else:
        lo, hi = img.getextrema()
    scale = 255 / (hi - lo) if hi > lo else 1.0
    offset = -lo * scale if hi > lo else 0.0
    img = _consumed(img, img.point(lambda v: v * scale + offset))
    out = _consumed(img, img.convert("L"))
    out.info.pop("transparency", None)  # a 16/32-bit transparent value means nothing in 8 bits
    return out


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:
        return 1  # unreadable EXIF is metadata noise, not a reason to refuse the pixels


def _too_many_pixels(limit: int, size: tuple[int, int] | None = None) -> ImageLoadError:
    what = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
    return ImageLoadError(f"The image is {what}, more than the {limit} pixel limit; send a smaller image.")
