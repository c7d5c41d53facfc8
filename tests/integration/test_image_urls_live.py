"""Image URLs through the live stack: fetched inside the Serve ingress replica, SSRF guard included."""

from __future__ import annotations

import http.server
import threading

import pytest
import requests

from tests.conftest import LOCAL_KEY, image_bytes

JPEG = image_bytes((1600, 1200), "JPEG", (90, 140, 30))


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body, status = (JPEG, 200) if self.path == "/photo.jpg" else (b"<html>no</html>", 200)
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")  # wrong on purpose: the format comes from the bytes
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def images():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


def run(stack, image_url):
    body = {"prompt": "What is this?", "image_url": image_url, "max_new_tokens": 4, "temperature": 0}
    return requests.post(f"{stack}/fal-ai/llavav15-13b", json=body,
                         headers={"Authorization": f"Key {LOCAL_KEY}"}, timeout=60)


def test_an_allow_listed_url_is_fetched_and_answered(stack, images):
    resp = run(stack, f"http://127.0.0.1:{images}/photo.jpg")
    assert resp.status_code == 200, resp.text
    assert resp.json()["stats"]["num_output_tokens"] == 4


@pytest.mark.parametrize(
    "url, err_type, words",
    [
        # Refused before any connection is made: other loopback addresses and cloud metadata.
        ("http://127.0.0.2:{port}/photo.jpg", "file_download_error", "non-public address"),
        ("http://169.254.169.254/latest/meta-data/", "file_download_error", "non-public address"),
        ("http://127.0.0.1:{port}/page.html", "image_load_error", "not an image"),
        ("file:///etc/passwd", "image_load_error", "http(s) URL or a data: URI"),
    ],
)
def test_unusable_urls_are_422_in_fal_shape(stack, images, url, err_type, words):
    resp = run(stack, url.format(port=images))
    assert resp.status_code == 422, resp.text
    item = resp.json()["detail"][0]
    assert item["loc"] == ["body", "image_url"] and item["type"] == err_type
    assert words in item["msg"], item["msg"]
