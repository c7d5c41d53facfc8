import asyncio
import base64
import http.server
import threading
import time
import urllib.parse

import pytest

from serve.config import MediaConfig
from serve.media.intake import ImageDownloadError, ImageIntake, ImageLoadError, decode_data_uri
from tests.conftest import data_uri, image_bytes

PNG = image_bytes((40, 30))


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/ok.png":
            self._send(200, PNG)
        elif self.path == "/missing.png":
            self._send(404, b"nope")
        elif self.path == "/big.png":
            self._send(200, b"\0" * 300_000)
        elif self.path == "/slow.png":
            time.sleep(2)
            self._send(200, PNG)
        elif self.path == "/text":
            self._send(200, b"<html>not an image</html>")
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.end_headers()

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def load(url, **cfg):
    intake = ImageIntake(MediaConfig(**{"fetch_timeout_s": 1.0, "max_image_bytes": 200_000, **cfg}))
    return asyncio.run(intake.load(url))


def test_data_uris_base64_and_percent_encoded():
    img = load(data_uri((33, 21), "JPEG"))
    assert img.mode == "RGB" and img.size == (33, 21)
    pct = "data:image/png," + urllib.parse.quote_from_bytes(PNG)
    assert load(pct).size == (40, 30)


@pytest.mark.parametrize(
    "uri, msg",
    [
        ("data:image/png;base64", "Malformed data URI"),
        ("data:image/png;base64,@@@@", "does not decode"),
        ("data:image/png;base64," + base64.b64encode(b"hello").decode(), "not a supported image"),
        ("data:image/png;base64," + base64.b64encode(PNG[:60]).decode(), "truncated or corrupt"),
        ("ftp://example.com/x.png", r"http\(s\) URL or a data: URI"),
        ("not a url", r"http\(s\) URL or a data: URI"),
    ],
)
def test_bad_references_are_load_errors(uri, msg):
    with pytest.raises(ImageLoadError, match=msg):
        load(uri)


def test_size_caps_apply_before_decoding():
    with pytest.raises(ImageLoadError, match="byte limit"):
        decode_data_uri("data:image/png;base64," + "A" * 400, max_bytes=100)
    with pytest.raises(ImageLoadError, match="pixel limit"):
        load(data_uri((500, 500)), max_image_pixels=100_000)


def test_fetch_ok_and_redirect(server):
    assert load(f"{server}/ok.png").size == (40, 30)
    assert load(f"{server}/redirect").size == (40, 30)


@pytest.mark.parametrize(
    "path, msg, exc",
    [
        ("/missing.png", "HTTP 404", ImageDownloadError),
        ("/big.png", "byte limit", ImageDownloadError),
        ("/slow.png", "longer than 1 s", ImageDownloadError),
        ("/text", "not a supported image", ImageLoadError),
    ],
)
def test_fetch_failures(server, path, msg, exc):
    with pytest.raises(exc, match=msg):
        load(f"{server}{path}")


def test_unreachable_host_is_download_error():
    with pytest.raises(ImageDownloadError, match="Failed to download"):
        load("http://127.0.0.1:1/x.png")
