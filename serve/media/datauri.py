"""`data:` URIs (RFC 2397): base64 or percent-encoded payloads, size-capped before decoding.

Base64 is read leniently where real clients differ and nothing is ambiguous: standard and URL-safe
alphabets, missing `=` padding, ASCII whitespace (line-wrapped MIME output) and a payload that was
itself percent-encoded (`%2B`, `%3D`) are all accepted. Anything else is an `ImageLoadError`.
"""

from __future__ import annotations

import urllib.parse

import pybase64

from serve.media.errors import ImageLoadError

_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_MALFORMED = "Malformed data URI: expected 'data:[<mime type>][;base64],<data>'."
_BAD_BASE64 = "Malformed data URI: the base64 payload does not decode; send the file's bytes base64-encoded."


def _too_large(max_bytes: int) -> ImageLoadError:
    return ImageLoadError(f"Image data is larger than the {max_bytes} byte limit; send a smaller image.")


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """The bytes a `data:` URI carries; the caller has checked the scheme."""
    header, sep, payload = uri[len("data:") :].partition(",")
    if not sep:
        raise ImageLoadError(_MALFORMED)
    # A percent-encoded payload is at most 3 characters per byte: anything longer is refused unread.
    if len(payload) > 3 * max_bytes + 4:
        raise _too_large(max_bytes)
    if header.rpartition(";")[2].strip().lower() == "base64":
        return _decode_base64(payload, max_bytes)
    return _decode_percent(payload, max_bytes)


def _decode_base64(payload: str, max_bytes: int) -> bytes:
    # Fast path: canonical base64, what nearly every client sends (len * 3 // 4 bounds its size).
    if len(payload) * 3 // 4 <= max_bytes:
        try:
            return pybase64.b64decode(payload, validate=True)
        except ValueError:
            pass
    if "%" in payload:
        payload = urllib.parse.unquote(payload)
    text = payload.translate(_WHITESPACE).rstrip("=")
    # The decoded size of unpadded base64, known before decoding.
    if len(text) * 3 // 4 > max_bytes:
        raise _too_large(max_bytes)
    try:
        raw = text.encode("ascii").translate(_URLSAFE_TO_STANDARD)
        return pybase64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except ValueError:  # binascii.Error and UnicodeEncodeError are ValueErrors
        raise ImageLoadError(_BAD_BASE64) from None


def _decode_percent(payload: str, max_bytes: int) -> bytes:
    try:
        raw = payload.encode("utf-8")
    except UnicodeEncodeError:
        raise ImageLoadError(_MALFORMED) from None
    # Each %XX escape is one byte: a lower bound before decoding, exact when every escape is valid.
    if len(raw) - 2 * raw.count(b"%") > max_bytes:
        raise _too_large(max_bytes)
    data = urllib.parse.unquote_to_bytes(raw)
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    return data
