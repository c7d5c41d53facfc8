"""A small LRU of decoded images keyed by a hash of their encoded bytes, bounded in bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict

from PIL import Image


def _nbytes(img: Image.Image) -> int:
    return img.width * img.height * len(img.getbands())


class ImageCache:
    def __init__(self, max_bytes: int):
        self._max_bytes = max_bytes
        self._items: OrderedDict[bytes, Image.Image] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # decodes run in worker threads

    def get(self, key: bytes) -> Image.Image | None:
        with self._lock:
            img = self._items.get(key)
            if img is None:
                return None
            self._items.move_to_end(key)
        return img.copy()  # callers own their image; the cached one is never handed out

    def put(self, key: bytes, img: Image.Image) -> None:
        size = _nbytes(img)
        if size > self._max_bytes:
            return
        img = img.copy()
        with self._lock:
            if key in self._items:
                return
            self._items[key] = img
            self._bytes += size
            while self._bytes > self._max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= _nbytes(old)
