"""What the load test and the benchmark send: photo-like images generated at start (several sizes, as
JPEG data URIs: no image host needed, and the SSRF guard never refuses them), prompts and lengths."""

from __future__ import annotations

import base64
import io
import random

from PIL import Image, ImageDraw, ImageFilter

# CLIP's own 336², a phone photo, a webcam frame, full HD: intake cost grows with the pixels.
SIZES = ((336, 336), (640, 480), (1024, 768), (1920, 1080))
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
