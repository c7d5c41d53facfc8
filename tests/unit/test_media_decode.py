"""Safe decode: bombs, corrupt files, every colour mode, EXIF rotation, animations, the bounded
downscale (and that the model's processor sees an equivalent image), the decode cache."""

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile
from transformers import AutoProcessor

from serve.config import MediaConfig
from serve.engine.tiny_model import build_tiny_model
from serve.media.bench import encode, photo_like
from serve.media.cache import ImageCache
from serve.media.decode import bounded_size, decode_image
from serve.media.errors import ImageLoadError, MediaError
from tests.conftest import ROOT

CFG = MediaConfig()
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def decode(data, **cfg):
    return decode_image(data, MediaConfig(**cfg) if cfg else CFG)


def pixel(img, xy=(0, 0)):
    return img.getpixel(xy)


# --- bombs and broken files --------------------------------------------------------------------


def png_claiming(width, height):
    """A valid-looking PNG whose header claims width x height but carries almost no data."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("size", [(9000, 9000), (100_000, 100_000)])  # over our cap; over Pillow's own
def test_decompression_bombs_are_refused_without_decoding(size, monkeypatch):
    def never(self):
        raise AssertionError("a bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    with pytest.raises(ImageLoadError, match="more than the 40000000 pixel limit"):
        decode(png_claiming(*size))


@pytest.mark.parametrize(
    "data, msg",
    [
        (b"", "not an image in a supported format"),
        (b"GIF89a" + b"\0" * 10, "truncated or corrupt|not an image"),
        (encode(photo_like(64, 48), "JPEG")[:300], "truncated or corrupt"),
        (encode(photo_like(64, 48), "PNG")[:-30], "truncated or corrupt"),
        (png_claiming(64, 48), "truncated or corrupt"),
    ],
)
def test_truncated_and_corrupt_files(data, msg):
    with pytest.raises(ImageLoadError, match=msg):
        decode(data)


def test_only_allowed_formats_sniffed_from_the_bytes():
    jpeg = encode(photo_like(64, 48), "JPEG")
    assert decode(jpeg, formats=["jpeg"]).size == (64, 48)
    with pytest.raises(ImageLoadError, match=r"supported format \(PNG\)"):
        decode(jpeg, formats=["PNG"])
    with pytest.raises(ImageLoadError, match="not an image in a supported format"):
        decode(encode(Image.new("RGB", (8, 8)), "PCX"))  # Pillow reads it; the default list does not


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt metadata it skips
@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from(
        [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"II*\0", b"BM"]
    ),
    body=st.binary(max_size=512),
)
def test_arbitrary_bytes_only_ever_raise_media_errors(prefix, body):
    try:
        img = decode(prefix + body)
    except MediaError:
        return
    assert img.mode == "RGB"


# --- colour modes ------------------------------------------------------------------------------


def _palette_with_transparency():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 30, 60] + [0] * 762)
    img.info["transparency"] = 1
    return img


MODES = {
    # mode: (image, format, expected RGB of its first pixel)
    "RGB": (Image.new("RGB", (4, 4), (200, 30, 60)), "PNG", (200, 30, 60)),
    "P": (Image.new("RGB", (4, 4), (200, 30, 60)).quantize(), "PNG", (200, 30, 60)),
    "P+transparency": (_palette_with_transparency(), "PNG", WHITE),
    "PA": (Image.merge("PA", [Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 0)]), "TIFF", WHITE),
    "LA": (Image.new("LA", (4, 4), (0, 128)), "PNG", (127, 127, 127)),
    "L": (Image.new("L", (4, 4), 100), "PNG", (100, 100, 100)),
    "RGBA opaque": (Image.new("RGBA", (4, 4), (200, 30, 60, 255)), "PNG", (200, 30, 60)),
    "RGBA transparent": (Image.new("RGBA", (4, 4), (200, 30, 60, 0)), "PNG", WHITE),
    "CMYK": (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG", WHITE),
    "CMYK tiff": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF", (255, 0, 0)),
    "I;16": (Image.new("I;16", (4, 4), 65535), "PNG", WHITE),
    "I": (Image.new("I", (4, 4), 1000), "TIFF", (255, 255, 255)),
    "F": (Image.new("F", (4, 4), 0.25), "TIFF", (0, 0, 0)),
    "1": (Image.new("1", (4, 4), 1), "PNG", WHITE),
    "1 tiff": (Image.new("1", (4, 4), 0), "TIFF", BLACK),
}


@pytest.mark.parametrize("name", MODES)
def test_every_mode_becomes_rgb(name):
    img, fmt, expected = MODES[name]
    data = encode(img, fmt)
    out = decode(data)
    assert Image.open(io.BytesIO(data)).mode == img.mode  # the file really is in that mode
    assert out.mode == "RGB" and out.size == img.size
    assert pixel(out) == pytest.approx(expected, abs=2)


def test_wide_modes_are_scaled_not_clipped():
    ramp16 = Image.fromarray(np.array([[0, 257, 32896, 65535]], np.uint16))
    assert [pixel(decode(encode(ramp16, "PNG")), (x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    floats = Image.fromarray(np.array([[-1.0, 0.0, 1.0, np.nan]], np.float32))
    assert [pixel(decode(encode(floats, "TIFF")), (x, 0))[0] for x in range(3)] == pytest.approx([0, 128, 255], abs=1)
    ints = Image.fromarray(np.array([[-5, 100, 1000]], np.int32))
    assert [pixel(decode(encode(ints, "TIFF")), (x, 0))[0] for x in range(3)] == pytest.approx([0, 27, 255], abs=1)


def test_semi_transparent_pixels_blend_over_white():
    out = decode(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG"))
    assert pixel(out) == pytest.approx((127, 127, 127), abs=1)


# --- orientation, animation --------------------------------------------------------------------


def halves(size, first=(255, 0, 0), second=(0, 0, 255)):
    """Left half `first`, right half `second`."""
    img = Image.new("RGB", size, second)
    img.paste(first, (0, 0, size[0] // 2, size[1]))
    return img


@pytest.mark.parametrize("size, bound", [((60, 40), None), ((2000, 1000), 672)])
def test_exif_orientation_is_applied(size, bound):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    data = encode(halves(size), "JPEG", exif=exif, quality=95)
    out = decode(data, downscale_short_edge=bound)
    w, h = size if bound is None else decode(encode(halves(size), "JPEG"), downscale_short_edge=bound).size
    assert out.size == (h, w)
    assert pixel(out, (h // 2, h // 4 if bound is None else w // 4)) == pytest.approx((255, 0, 0), abs=12)
    assert pixel(out, (h // 2, w - w // 4)) == pytest.approx((0, 0, 255), abs=12)


def test_corrupt_exif_is_ignored():
    data = encode(halves((60, 40)), "JPEG", exif=b"Exif\0\0" + b"\xff" * 40)
    assert decode(data).size == (60, 40)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_gives_the_first_frame(fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert pixel(decode(data)) == pytest.approx((255, 0, 0), abs=8)


# --- bounded downscale -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [((4000, 3000), (896, 672)), ((3000, 4000), (672, 896)), ((4001, 2999), (896, 672)), ((700, 700), (672, 672))],
)
def test_bounded_size(size, expected):
    assert bounded_size(size, 672) == expected


@pytest.mark.parametrize(
    "size, fmt, expected",
    [
        ((4000, 3000), "JPEG", (1000, 750)),  # decoded at 1/4 scale, exact: nothing more to do
        ((3840, 2160), "PNG", (1280, 720)),  # box reduction by 3, exact
        ((1920, 1080), "PNG", (1920, 1080)),  # already under 2x the bound
        ((4001, 2999), "JPEG", (896, 672)),  # 1/4 scale leaves a partial block: resampled to the bound
        ((1500, 2001), "PNG", (672, 896)),  # does not divide: resampled to the bound
        ((640, 480), "JPEG", (640, 480)),  # under the bound: untouched
    ],
)
def test_downscale_bounds_the_shortest_edge(size, fmt, expected):
    data = encode(photo_like(*size, seed=3), fmt)
    assert decode(data).size == expected
    assert decode(data, downscale_short_edge=None).size == size


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The model's real image processor (CLIP: shortest edge 336 bicubic, centre crop, normalise)."""
    model = ROOT / ".cache" / "tiny-llava"
    if not (model / "processor_config.json").exists():
        model = build_tiny_model(tmp_path_factory.mktemp("tiny-llava"))
    processor = AutoProcessor.from_pretrained(model).image_processor
    return lambda img: processor(img, return_tensors="np")["pixel_values"][0]


# Tolerance, in the processor's normalised units (one 8-bit grey level is about 0.015): the reduced
# path's pixel_values may differ from the unreduced path's by at most 0.01 on average (under one
# grey level) and 0.2 at any single value (a resampling difference at a hard edge). Measured on
# these four images, one per reduction path: mean 0.003-0.004, max 0.06-0.10.
MEAN_TOLERANCE, MAX_TOLERANCE = 0.01, 0.2


@pytest.mark.parametrize(
    "size, fmt",
    [((4000, 3000), "JPEG"), ((4001, 2999), "JPEG"), ((3840, 2160), "PNG"), ((2999, 4001), "PNG")],
)
def test_processor_sees_an_equivalent_image(clip, size, fmt):
    data = encode(photo_like(*size), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    reduced, full = decode(data), decode(data, downscale_short_edge=None)
    assert full.size == size and 672 <= min(reduced.size) < 2 * 672
    diff = np.abs(clip(reduced) - clip(full))
    assert diff.mean() <= MEAN_TOLERANCE and diff.max() <= MAX_TOLERANCE, (diff.mean(), diff.max())


# --- cache -------------------------------------------------------------------------------------


def test_cache_hands_out_copies_and_evicts_least_recent_by_bytes():
    a, b, c = (Image.new("RGB", (10, 10), color) for color in [(1, 1, 1), (2, 2, 2), (3, 3, 3)])
    cache = ImageCache(max_bytes=2 * 300)  # room for two 10x10 RGB images
    cache.put(b"a", a)
    cache.put(b"b", b)
    hit = cache.get(b"a")
    assert hit is not a and pixel(hit) == (1, 1, 1)
    hit.putpixel((0, 0), (9, 9, 9))
    assert pixel(cache.get(b"a")) == (1, 1, 1)  # the caller's edit did not reach the cache
    cache.put(b"c", c)  # evicts b, the least recently used
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.get(b"c") is not None
    cache.put(b"huge", Image.new("RGB", (100, 100)))  # larger than the whole cache: not kept
    assert cache.get(b"huge") is None and cache.get(b"a") is not None
