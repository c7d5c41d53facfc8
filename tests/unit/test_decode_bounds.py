"""What one image can cost a replica: refused from its header when its shape cannot be served, and decoded
only within the replica's decode memory budget, which every ending of a decode gives back."""

import asyncio
import base64
import io
import subprocess
import sys
import textwrap
import threading

import pytest
from PIL import Image, ImageFile
from pydantic import ValidationError

import serve.media.intake as intake_module
from serve.config import MediaConfig
from serve.media.budget import DecodeBudget
from serve.media.decode import decode_image
from serve.media.errors import ImageLoadError
from serve.media.intake import ImageIntake
from tests.conftest import ROOT

GUARD = 60  # s: only ends a test that would otherwise hang; no assertion is about time


def png(size, mode="L"):
    buf = io.BytesIO()
    Image.new(mode, size, 0).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data):
    return "data:image/png;base64," + base64.b64encode(data).decode()


# --- aspect ratio ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 100_000), (60_000, 2)])
def test_extreme_aspect_ratios_are_refused_from_the_header(size, monkeypatch):
    data = png(size)
    assert len(data) < 1000  # a few hundred bytes that would become 336 x 33.6M pixels in the processor

    def never(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    with pytest.raises(ImageLoadError, match=r"one side more than 20 times the other.*at most 20:1") as refused:
        asyncio.run(ImageIntake(MediaConfig()).load(data_uri(data)))
    assert f"{size[0]}x{size[1]} pixels" in str(refused.value)


@pytest.mark.parametrize("size", [(20, 400), (400, 20), (8000, 400)])
def test_panoramas_up_to_the_ratio_are_decoded(size):
    assert decode_image(png(size), MediaConfig()).size[0] * 20 >= decode_image(png(size), MediaConfig()).size[1]


def test_the_ratio_is_configurable():
    with pytest.raises(ImageLoadError, match="more than 4 times"):
        decode_image(png((500, 100)), MediaConfig(max_aspect_ratio=4))


# --- decode memory budget ----------------------------------------------------------------------

SMALL = dict(max_image_pixels=10_000, decode_memory_bytes=200_000)  # a 100x100 PNG reserves 80 000 bytes: 2 fit
SQUARE = png((100, 100), "RGB")


def test_the_budget_must_admit_the_largest_image():
    with pytest.raises(ValidationError, match="decode_memory_bytes .* must be at least 2000000000"):
        MediaConfig(max_image_pixels=100_000_000)
    MediaConfig(max_image_pixels=100_000_000, decode_memory_bytes=2_000_000_000)


def test_an_image_over_the_whole_budget_is_refused_not_queued_forever():
    cfg = MediaConfig().model_copy(update={"decode_memory_bytes": 1000})  # below what the validator allows
    with pytest.raises(ImageLoadError, match="more than this server can decode at once"):
        decode_image(SQUARE, cfg)


def test_concurrent_decodes_never_exceed_the_budget(monkeypatch):
    intake = ImageIntake(MediaConfig(**SMALL, cache_max_bytes=0))
    running, most = [], []
    pairs = threading.Barrier(2, timeout=GUARD)  # passes only when two decodes run at once
    real = intake_module.decode_opened

    def decode(opened, cfg):
        running.append(opened)
        most.append((len(running), intake.budget.in_use))
        pairs.wait()
        try:
            return real(opened, cfg)
        finally:
            running.remove(opened)

    monkeypatch.setattr(intake_module, "decode_opened", decode)

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(intake.load(data_uri(SQUARE)) for _ in range(6))), GUARD)

    assert [img.size for img in asyncio.run(main())] == [(100, 100)] * 6
    assert max(n for n, _ in most) == 2
    assert max(in_use for _, in_use in most) <= intake.budget.capacity
    assert intake.budget.in_use == 0


def test_a_failed_decode_gives_its_share_back(monkeypatch):
    intake = ImageIntake(MediaConfig(**SMALL, cache_max_bytes=0))
    real = intake_module.decode_opened
    calls = []

    def decode(opened, cfg):
        calls.append(opened)
        if len(calls) <= 3:
            raise ImageLoadError("broken")
        return real(opened, cfg)

    monkeypatch.setattr(intake_module, "decode_opened", decode)

    async def main():
        results = await asyncio.gather(*(intake.load(data_uri(SQUARE)) for _ in range(3)), return_exceptions=True)
        return results, intake.budget.in_use, await intake.load(data_uri(SQUARE))

    results, in_use, image = asyncio.run(main())
    assert all(isinstance(r, ImageLoadError) for r in results)
    assert in_use == 0 and image.size == (100, 100)


def test_a_cancelled_decode_holds_its_share_until_its_thread_ends(monkeypatch):
    intake = ImageIntake(MediaConfig(**SMALL, cache_max_bytes=0))
    started, finish = threading.Event(), threading.Event()
    real = intake_module.decode_opened

    def decode(opened, cfg):
        started.set()
        finish.wait(GUARD)
        return real(opened, cfg)

    monkeypatch.setattr(intake_module, "decode_opened", decode)

    async def main():
        load = asyncio.ensure_future(intake.load(data_uri(SQUARE)))
        await asyncio.to_thread(started.wait, GUARD)
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        held = intake.budget.in_use  # the thread still decodes: its memory is still in use
        finish.set()
        while intake.budget.in_use:
            await asyncio.sleep(0.01)
        return held

    assert asyncio.run(asyncio.wait_for(main(), GUARD)) == 80_000


def test_a_decode_cancelled_while_waiting_leaves_the_queue():
    budget = DecodeBudget(100)
    release = threading.Event()

    async def main():
        first = asyncio.ensure_future(budget.run(60, lambda: release.wait(GUARD)))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(budget.run(60, lambda: "never"))  # no room: it waits
        behind = asyncio.ensure_future(budget.run(30, lambda: "small"))  # fits, but waits its turn
        await asyncio.sleep(0.05)
        assert not behind.done()
        waiting.cancel()
        small = await behind  # the head of the queue left: the one behind it goes
        release.set()
        await first
        return small, waiting.cancelled(), budget.in_use

    assert asyncio.run(asyncio.wait_for(main(), GUARD)) == ("small", True, 0)


# --- the reservation covers what a decode really holds -----------------------------------------

_PEAK = textwrap.dedent(
    """
    import io, resource, sys
    import numpy as np
    from PIL import Image
    from serve.config import MediaConfig
    from serve.media.decode import decode_opened, open_image

    def encoded(size, kind):
        rng = np.random.default_rng(0)
        w, h = size
        img = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 4), dtype=np.uint8), "RGBA").resize(size)
        buf = io.BytesIO()
        if kind == "rgba-png":
            img.save(buf, "PNG")
        elif kind == "rgba-webp":
            img.save(buf, "WEBP", lossless=True)
        else:
            img.convert("CMYK").save(buf, "JPEG", progressive=True)
        return buf.getvalue()

    kind, cfg = sys.argv[1], MediaConfig(downscale_short_edge=None)
    decode_opened(open_image(encoded((64, 64), kind), cfg), cfg)  # the codec's own code and tables loaded
    data = encoded((3000, 3000), kind)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    opened = open_image(data, cfg)
    decode_opened(opened, cfg)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, opened.cost)
    """
)


@pytest.mark.parametrize("kind", ["rgba-png", "rgba-webp", "cmyk-progressive-jpeg"])
def test_the_reservation_covers_the_peak_memory_of_the_decode(kind):
    # Peak RSS of a fresh process (what the reservation must cover) for the costliest decoders.
    out = subprocess.run([sys.executable, "-c", _PEAK, kind], cwd=ROOT, capture_output=True, text=True, check=True)
    peak, cost = map(int, out.stdout.split())
    assert peak <= cost
