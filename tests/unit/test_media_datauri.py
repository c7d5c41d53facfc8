"""The data: URI parser, property-based: arbitrary bytes round-trip, arbitrary text only ever
raises MediaError, and nothing over the byte cap is ever returned."""

import base64
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.media.datauri import decode_data_uri
from serve.media.errors import ImageLoadError, MediaError

CAP = 4096
payloads = st.binary(max_size=CAP)
# Text built from the characters the parser treats specially, plus anything at all (surrogates too).
tricky_text = st.text(st.sampled_from("AZaz09+/-_=%,; \n\t") | st.characters(exclude_categories=()), max_size=200)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wrapped(text: str, width: int = 76) -> str:
    return "\r\n".join(text[i : i + width] for i in range(0, len(text), width))


@settings(max_examples=200)
@given(data=payloads, mime=st.sampled_from(["", "image/png", "image/jpeg;name=a.jpg", "application/octet-stream"]))
def test_base64_round_trip(data, mime):
    assert decode_data_uri(f"data:{mime};base64,{b64(data)}", CAP) == data
    assert decode_data_uri(f"DATA:{mime};BASE64,{b64(data)}", CAP) == data


@settings(max_examples=200)
@given(data=payloads)
def test_lenient_base64_forms_round_trip(data):
    urlsafe_unpadded = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert decode_data_uri(f"data:;base64,{urlsafe_unpadded}", CAP) == data
    assert decode_data_uri(f"data:;base64,{wrapped(b64(data))}", CAP) == data  # MIME line wrapping
    assert decode_data_uri(f"data:;base64,{urllib.parse.quote(b64(data), safe='')}", CAP) == data


@settings(max_examples=200)
@given(data=payloads, safe=st.sampled_from(["", "/", "/+=;:@&"]))
def test_percent_encoded_round_trip(data, safe):
    assert decode_data_uri("data:image/png," + urllib.parse.quote_from_bytes(data, safe=safe), CAP) == data


@settings(max_examples=500)
@given(text=tricky_text, base64_flag=st.booleans(), cap=st.integers(0, 64))
def test_arbitrary_text_only_raises_media_errors_and_respects_the_cap(text, base64_flag, cap):
    uri = f"data:image/png{';base64' if base64_flag else ''},{text}"
    try:
        data = decode_data_uri(uri, cap)
    except MediaError:
        return
    assert isinstance(data, bytes) and len(data) <= cap


@settings(max_examples=300)
@given(text=tricky_text)
def test_arbitrary_uris_only_raise_media_errors(text):
    try:
        decode_data_uri("data:" + text, CAP)
    except MediaError:
        pass


@pytest.mark.parametrize("size, fits", [(300, True), (301, False)])
def test_cap_is_exact_for_every_encoding(size, fits):
    data = b"\x07" * size
    uris = [
        f"data:;base64,{b64(data)}",
        f"data:;base64,{wrapped(b64(data), 4)}",
        f"data:;base64,{base64.urlsafe_b64encode(data).decode().rstrip('=')}",
        "data:," + urllib.parse.quote_from_bytes(data),
    ]
    for uri in uris:
        if fits:
            assert decode_data_uri(uri, 300) == data
        else:
            with pytest.raises(ImageLoadError, match="larger than the 300 byte limit"):
                decode_data_uri(uri, 300)


def test_oversized_payload_is_refused_unread():
    with pytest.raises(ImageLoadError, match="byte limit"):
        decode_data_uri("data:," + "%" * 10_000, 100)
