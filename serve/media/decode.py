"""Safe decode: encoded bytes -> an RGB image bounded for the engine, without decoding a bomb.

Order matters for speed: the pixel cap is checked on the header, JPEGs are decoded straight at a
reduced scale (`draft`), only the first frame of an animation is decoded, and the bounded downscale
runs before the EXIF rotation so each step touches as few pixels as possible.
"""

from __future__ import annotations

import io
import logging

from PIL import ExifTags, Image, UnidentifiedImageError

from serve.config import MediaConfig
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


def decode_image(data: bytes, cfg: MediaConfig) -> Image.Image:
    """Decode untrusted bytes; any failure is an `ImageLoadError` with a message for the caller."""
    try:
        return _decode(data, cfg)
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


def _decode(data: bytes, cfg: MediaConfig) -> Image.Image:
    img = Image.open(io.BytesIO(data), formats=cfg.formats)
    # Image.open reads only the header: refuse oversized images before decoding any pixel.
    if img.width * img.height > cfg.max_image_pixels:
        raise _too_many_pixels(cfg.max_image_pixels, img.size)
    full_size, edge = img.size, cfg.downscale_short_edge
    shrink = edge is not None and min(full_size) > edge
    box = None
    if shrink:
        # JPEG only (None elsewhere): decode at the smallest 1/2, 1/4 or 1/8 scale still >= edge. The
        # box is the original's extent in decoded pixels: a last partial block must not stretch it.
        drafted = img.draft(img.mode, (edge, edge))
        box = drafted[1] if drafted else None
    img.load()  # the first frame of an animation
    orientation = _orientation(img)
    rgb = _to_rgb(img)
    if shrink:
        rgb = _shrink(rgb, full_size, box, edge)
    return rgb.transpose(_ORIENTATION[orientation]) if orientation in _ORIENTATION else rgb


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
    """Any Pillow mode -> RGB; alpha and palette transparency are composited over `BACKGROUND`."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _wide_to_l(img)
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:
        raise ImageLoadError(f"Images in colour mode {img.mode} are not supported; convert it to RGB.") from None


def _wide_to_l(img: Image.Image) -> Image.Image:
    # 16-bit data maps at full scale (65535 -> 255). 32-bit integer and float data have no standard
    # range, so their own min..max is stretched to 0..255 (a constant image keeps its value, clipped).
    if img.mode.startswith("I;16"):
        img, (lo, hi) = img.convert("I"), (0, 65535)
    else:
        lo, hi = img.getextrema()
    scale = 255 / (hi - lo) if hi > lo else 1.0
    offset = -lo * scale if hi > lo else 0.0
    out = img.point(lambda v: v * scale + offset).convert("L")
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
