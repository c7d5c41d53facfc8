"""The media errors: each message says what was wrong and what the caller can do about it."""

from __future__ import annotations


class MediaError(ValueError):
    """An image that cannot be used; its text is safe to show the caller."""


class ImageDownloadError(MediaError):
    """The URL could not be fetched (refused address, unreachable, error status, too slow, too large)."""


class ImageLoadError(MediaError):
    """The bytes are not a usable image, or the reference is malformed."""
