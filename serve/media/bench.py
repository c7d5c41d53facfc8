"""Image intake benchmark: encoded bytes -> model-ready image, ours vs vLLM's own media loader.

    .venv/bin/python -m serve.media.bench [--repeat N] [--model DIR]

Generates the images locally (nothing touches the network) and feeds each one as a data: URI,
in one event loop, to `ImageIntake.load` (draft + bounded downscale, cache off) and to vLLM's
`MediaConnector.fetch_image_async` (what vLLM's OpenAI server calls for an image_url); then times
the model's CLIP image processor on each result, since that is what the engine runs next. Prints
medians in one table, and how far our pixel_values are from those of vLLM's full-size image.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from serve.config import MediaConfig
from serve.media.intake import ImageIntake


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with a photo's statistics: gradients, smooth blobs, sensor noise and hard edges
    (a flat colour would make both JPEG decoding and the equivalence checks meaningless)."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[0:height, 0:width]
    gradient = np.dstack(
        np.broadcast_arrays(x / width * 200 + 30, y / height * 180 + 40, (x + y) / (width + height) * 150 + 60)
    )
    blobs = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * 10
    pixels = 0.5 * gradient + 0.5 * np.asarray(blobs, np.float32) + noise
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(20):
        cx, cy, r = (
            int(rng.integers(0, width)),
            int(rng.integers(0, height)),
            int(rng.integers(width // 50, width // 8)),
        )
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def bench_images() -> dict[str, bytes]:
    return {
        "12 MP JPEG 4000x3000": encode(photo_like(4000, 3000), "JPEG", quality=90),
        "4K PNG 3840x2160": encode(photo_like(3840, 2160, seed=1), "PNG"),
        "small JPEG 640x480": encode(photo_like(640, 480, seed=2), "JPEG", quality=90),
    }


def _medians_ms(fns: list[Callable[[], object]], repeat: int) -> list[tuple[float, object]]:
    """Median ms of each function and its last result; runs interleave, so drift hits all alike."""
    times: list[list[float]] = [[] for _ in fns]
    results: list[object] = [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t) * 1000, r) for t, r in zip(times, results)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per image and path (median reported)")
    parser.add_argument("--model", type=Path, default=Path(".cache/tiny-llava"), help="model dir with the processor")
    args = parser.parse_args()

    # Imported here: both take seconds, and only the benchmark needs them.
    from transformers import AutoProcessor
    from vllm.multimodal.media import MediaConnector

    processor = AutoProcessor.from_pretrained(args.model).image_processor
    intake = ImageIntake(MediaConfig(cache_max_bytes=0))
    connector = MediaConnector()
    loop = asyncio.new_event_loop()

    def ours(uri: str) -> Image.Image:
        return loop.run_until_complete(intake.load(uri))

    def theirs(uri: str) -> Image.Image:
        return loop.run_until_complete(connector.fetch_image_async(uri)).media

    def clip(img: Image.Image) -> np.ndarray:
        return processor(img, return_tensors="np")["pixel_values"][0]

    header = (
        f"{'image':22} {'bytes':>10} | {'ours ms':>8} {'vLLM ms':>8} {'x':>5} | {'CLIP ours':>9} {'CLIP vLLM':>9} "
        f"| {'total ours':>10} {'total vLLM':>10} {'x':>5} | {'ours size':>10} | {'mean|d|':>7} {'max|d|':>6}"
    )
    print(f"medians of {args.repeat} runs; ms per image; |d|: pixel_values, ours vs vLLM's (normalised units)")
    print(header)
    print("-" * len(header))
    for name, data in bench_images().items():
        uri = "data:application/octet-stream;base64," + base64.b64encode(data).decode()
        for warm_up in (ours, theirs):  # lazy initialisation on both paths
            warm_up(uri)
        (ours_ms, our_img), (theirs_ms, their_img) = _medians_ms(
            [functools.partial(ours, uri), functools.partial(theirs, uri)], args.repeat
        )
        (clip_ours_ms, pv_ours), (clip_theirs_ms, pv_theirs) = _medians_ms(
            [functools.partial(clip, our_img), functools.partial(clip, their_img)], args.repeat
        )
        diff = np.abs(pv_ours - pv_theirs)
        total_ours, total_theirs = ours_ms + clip_ours_ms, theirs_ms + clip_theirs_ms
        size = "x".join(map(str, our_img.size))
        print(
            f"{name:22} {len(data):>10} | {ours_ms:8.1f} {theirs_ms:8.1f} {theirs_ms / ours_ms:5.1f} "
            f"| {clip_ours_ms:9.1f} {clip_theirs_ms:9.1f} | {total_ours:10.1f} {total_theirs:10.1f} "
            f"{total_theirs / total_ours:5.1f} | {size:>10} | {diff.mean():7.4f} {diff.max():6.3f}"
        )
    loop.close()


if __name__ == "__main__":
    main()
