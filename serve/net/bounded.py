"""Reading a body of at most so many bytes, whoever sends it (a client's request, an image host's answer)."""

from __future__ import annotations

from typing import AsyncIterator, Callable


async def read_bounded(
    chunks: AsyncIterator[bytes], limit: int, declared: str, refuse: Callable[[], Exception]
) -> bytes:
    """The whole body, if it is at most `limit` bytes; else `refuse()` is raised, from its declared length
    (a Content-Length) before any of it is read, or as soon as what arrived passes the limit: a body over
    the limit is never buffered whole."""
    if declared.isdigit() and int(declared) > limit:
        raise refuse()
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise refuse()
        parts.append(chunk)
    return b"".join(parts)
