"""What the load test and the benchmark send: photo-like images generated at start (several sizes, as
JPEG data URIs: no image host needed, and the SSRF guard never refuses them), prompts and lengths.

`unique_images` is the benchmark's `--unique-images`: a different photo-like JPEG for every request, so
that no image cache (ours, or vLLM's multimodal cache) ever sees one twice."""

from __future__ import annotations

import base64
import io
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# CLIP's own 336², a phone photo, a webcam frame, full HD: intake cost grows with the pixels.
SIZES = ((336, 336), (640, 480), (1024, 768), (1920, 1080))
# --unique-images: a webcam frame to a small photo, in turn (JPEG quality 85: about 54, 83 and 130 KiB).
UNIQUE_SIZES = ((640, 480), (800, 600), (1024, 768))
PROMPTS = (
    "What is in this picture?",
    "Describe the scene in detail.",
    "How many objects can you see, and what colours are they?",
    "Write a short caption for this image.",
)


def photo(size: tuple[int, int], seed: int) -> bytes:
    """A JPEG with gradients, shapes, texture and noise, so it compresses like a photo, not a flat fill."""
    rng = random.Random(seed)
    w, h = size
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    tint = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    img = Image.blend(img, tint, 0.5)
    draw = ImageDraw.Draw(img)
    for _ in range(24):
        x, y = rng.randrange(w), rng.randrange(h)
        r = rng.randrange(max(w, h) // 40, max(w, h) // 6)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    img = img.filter(ImageFilter.GaussianBlur(2))
    noise = Image.effect_noise(size, 24).convert("RGB")
    img = Image.blend(img, noise, 0.15)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def images(seed: int = 0) -> list[str]:
    """One data URI per size."""
    return [data_uri(photo(size, seed + i)) for i, size in enumerate(SIZES)]


def noise_canvas(seed: int = 0, margin: int = 64) -> Image.Image:
    """Grey Gaussian sensor noise (sigma 24, from numpy's seeded generator: the same bytes on every
    machine), large enough for a crop of the largest unique size at any offset below `margin`."""
    w, h = max(s[0] for s in UNIQUE_SIZES) + margin, max(s[1] for s in UNIQUE_SIZES) + margin
    grey = np.random.default_rng(seed).normal(128, 24, (h, w))
    return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L").convert("RGB")


def unique_photo(index: int, seed: int = 0, noise: Image.Image | None = None) -> bytes:
    """Request `index`'s own JPEG, a pure function of (seed, index), about 7 ms: a rotated gradient with
    a random tint and 24 random discs drawn at half size, scaled up (soft edges, as a photo's), then
    blended 80/20 with a crop of the noise canvas at a random offset (texture that compresses like a
    photo's), saved at quality 85. Cheaper than `photo` (no blur, no per-image noise), so thousands can
    be made ahead of a run."""
    noise = noise if noise is not None else noise_canvas(seed)
    rng = random.Random(seed * 1_000_003 + index)
    w, h = UNIQUE_SIZES[index % len(UNIQUE_SIZES)]
    hw, hh = w // 2, h // 2
    img = Image.linear_gradient("L").rotate(rng.randrange(360)).resize((hw, hh)).convert("RGB")
    img = Image.blend(img, Image.new("RGB", (hw, hh), tuple(rng.randrange(256) for _ in range(3))), 0.5)
    draw = ImageDraw.Draw(img)
    for _ in range(24):
        x, y = rng.randrange(hw), rng.randrange(hh)
        r = rng.randrange(max(hw, hh) // 40, max(hw, hh) // 6)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    img = img.resize((w, h), Image.BILINEAR)
    ox, oy = rng.randrange(noise.width - w + 1), rng.randrange(noise.height - h + 1)
    img = Image.blend(img, noise.crop((ox, oy, ox + w, oy + h)), 0.2)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def unique_images(count: int, seed: int = 0) -> list[str]:
    """`count` data URIs, request i's image at i: all different, the same list for the same seed."""
    noise = noise_canvas(seed)
    return [data_uri(unique_photo(i, seed, noise)) for i in range(count)]
