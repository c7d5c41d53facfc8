"""Image intake end to end: data: URIs and http(s) fetches from a local server, behind the SSRF guard.

Network rule: every connection these tests open goes to 127.0.0.1 (the autouse `connections`
fixture fails any other). Hostnames such as `evil.test` exist only in injected resolvers.
"""

import asyncio
import base64
import datetime
import http.server
import ipaddress
import ssl
import threading
import time
import urllib.parse
from typing import ClassVar

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import serve.media.intake as intake_module
from serve.config import MediaConfig
from serve.media.datauri import decode_data_uri
from serve.media.fetch import Fetcher
from serve.media.intake import ImageDownloadError, ImageIntake, ImageLoadError
from serve.net.guard import is_public
from tests.conftest import data_uri, image_bytes

PNG = image_bytes((40, 30))
LOOPBACK = "127.0.0.1/32"


class _Handler(http.server.BaseHTTPRequestHandler):
    hosts: ClassVar[list[str]] = []  # Host header of every request served

    def do_GET(self):
        _Handler.hosts.append(self.headers["Host"])
        path, _, query = self.path.partition("?")
        route = {
            "/ok.png": lambda: self._send(200, PNG),
            "/as-html": lambda: self._send(200, PNG, content_type="text/html"),
            "/missing.png": lambda: self._send(404, b"nope"),
            "/big.png": lambda: self._send(200, b"\0" * 300_000),
            "/endless": self._endless,
            "/slow.png": lambda: (time.sleep(2), self._send(200, PNG)),
            "/stall": self._stall,
            "/text": lambda: self._send(200, b"<html>not an image</html>", content_type="image/png"),
            "/truncated.png": lambda: self._send(200, PNG[: len(PNG) // 2]),
            "/cut-short": self._cut_short,
            "/gzip": lambda: self._send(200, PNG, headers={"Content-Encoding": "gzip"}),
            "/redirect": lambda: self._redirect(query or "/ok.png"),
            "/loop": lambda: self._redirect("/loop"),
            "/no-location": lambda: self._send(302, b""),
        }
        if path.startswith("/chain/"):  # /chain/N: N redirects, then the image
            hops = int(path.rsplit("/", 1)[1])
            return self._redirect(f"/chain/{hops - 1}" if hops > 1 else "/ok.png")
        route.get(path, lambda: self._send(404, b""))()

    def _send(self, status, body, content_type="image/png", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", urllib.parse.unquote(location))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _endless(self):
        # No Content-Length: the body ends when the connection does, so only the streamed count can stop it.
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(800):
                self.wfile.write(b"\0" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _stall(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG[:10])
        self.wfile.flush()
        time.sleep(1.5)

    def _cut_short(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(PNG) + 1000))
        self.end_headers()
        self.wfile.write(PNG)
        self.close_connection = True

    def log_message(self, *args):
        pass


def _serve(wrap=lambda sock: sock):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.socket = wrap(srv.socket)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def server():
    srv = _serve()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(autouse=True)
def connections(monkeypatch):
    """Every address a request is sent to; anything but 127.0.0.1 fails the test before connecting."""
    seen = []
    original = httpx.AsyncHTTPTransport.handle_async_request

    async def guarded(self, request):
        seen.append(request.url.host)
        assert request.url.host == "127.0.0.1", f"test tried to connect to {request.url.host}"
        return await original(self, request)

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", guarded)
    _Handler.hosts.clear()
    return seen


def fake_dns(table):
    """A resolver from a dict; records every lookup."""
    lookups = []

    async def resolve(host, port):
        lookups.append(host)
        if host not in table:
            raise OSError("no such host")
        return table[host]

    resolve.lookups = lookups
    return resolve


def load(url, *, resolve=None, verify=True, **cfg):
    config = MediaConfig(**{"fetch_timeout_s": 1.0, "max_image_bytes": 200_000, "allow_networks": [LOOPBACK], **cfg})

    async def run():
        # No real DNS in tests: only IP literals and the names an injected resolver knows resolve.
        intake = ImageIntake(config, fetcher=Fetcher(config, resolve=resolve or fake_dns({}), verify=verify))
        try:
            return await intake.load(url)
        finally:
            await intake.aclose()

    return asyncio.run(run())


# --- data: URIs --------------------------------------------------------------------------------


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
        ("data:image/png;base64," + base64.b64encode(b"hello").decode(), "not an image in a supported format"),
        ("data:image/png;base64," + base64.b64encode(PNG[:60]).decode(), "truncated or corrupt"),
        ("ftp://example.com/x.png", r"http\(s\) URL or a data: URI"),
        ("not a url", r"http\(s\) URL or a data: URI"),
        ("http:///x.png", "no host"),
        ("http://[zz]/x.png", "not a valid URL"),
        ("http://127.0.0.1:99999/x.png", "port outside 1-65535"),
    ],
)
def test_bad_references_are_load_errors(uri, msg, connections):
    with pytest.raises(ImageLoadError, match=msg):
        load(uri)
    assert connections == []


@pytest.mark.parametrize("cache_max_bytes, decodes", [(1 << 20, 1), (0, 2)])
def test_a_repeated_image_is_decoded_once(cache_max_bytes, decodes, monkeypatch):
    calls = []
    real = intake_module.decode_opened
    monkeypatch.setattr(intake_module, "decode_opened", lambda opened, cfg: calls.append(cfg) or real(opened, cfg))
    intake = ImageIntake(MediaConfig(cache_max_bytes=cache_max_bytes))

    async def twice():
        return [await intake.load(data_uri()) for _ in range(2)]

    first, second = asyncio.run(twice())
    assert len(calls) == decodes
    assert first is not second and first.tobytes() == second.tobytes()


def test_size_caps_apply_before_decoding():
    with pytest.raises(ImageLoadError, match="byte limit"):
        decode_data_uri("data:image/png;base64," + "A" * 400, max_bytes=100)
    with pytest.raises(ImageLoadError, match="pixel limit"):
        load(data_uri((500, 500)), max_image_pixels=100_000)


# --- http(s) fetches ---------------------------------------------------------------------------


def test_fetch_ok_and_redirect(server):
    assert load(f"{server}/ok.png").size == (40, 30)
    assert load(f"{server}/redirect").size == (40, 30)


def test_format_comes_from_the_bytes_not_content_type(server):
    assert load(f"{server}/as-html").size == (40, 30)


@pytest.mark.parametrize(
    "path, msg, exc",
    [
        ("/missing.png", "HTTP 404", ImageDownloadError),
        ("/big.png", "byte limit", ImageDownloadError),
        ("/endless", "byte limit", ImageDownloadError),
        ("/slow.png", "longer than 1 s", ImageDownloadError),
        ("/cut-short", "closed the connection before the whole image arrived", ImageDownloadError),
        ("/gzip", r"compressed \(Content-Encoding: gzip\)", ImageDownloadError),
        ("/loop", "redirects in a loop", ImageDownloadError),
        ("/chain/4", "redirected more than 3 times", ImageDownloadError),
        ("/no-location", "without a Location", ImageDownloadError),
        ("/redirect?ftp://example.com/x.png", "redirected to a URL that is not an http", ImageDownloadError),
        ("/text", "not an image in a supported format", ImageLoadError),
        ("/truncated.png", "truncated or corrupt", ImageLoadError),
    ],
)
def test_fetch_failures(server, path, msg, exc):
    with pytest.raises(exc, match=msg):
        load(f"{server}{path}")


def test_redirect_limit_counts_hops(server):
    assert load(f"{server}/chain/3").size == (40, 30)
    with pytest.raises(ImageDownloadError, match="more than 0 times"):
        load(f"{server}/redirect", max_redirects=0)


def test_read_timeout_between_bytes(server):
    with pytest.raises(ImageDownloadError, match=r"sent nothing for 0.3 s"):
        load(f"{server}/stall", read_timeout_s=0.3, fetch_timeout_s=5)


def test_unreachable_host_is_download_error():
    with pytest.raises(ImageDownloadError, match="Could not connect"):
        load("http://127.0.0.1:1/x.png")


def test_unresolvable_host_is_download_error(connections):
    with pytest.raises(ImageDownloadError, match="could not be resolved"):
        load("http://nowhere.test/x.png", resolve=fake_dns({}))
    assert connections == []


# --- SSRF guard --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "10.0.0.5", "172.16.3.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
        "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1", "::1", "::", "fe80::1", "fd00::1",
        "ff02::1", "ff0e::1", "::ffff:127.0.0.1", "::ffff:10.0.0.5", "::ffff:169.254.169.254",
        "2002:7f00:1::", "2002:a00:5::", "64:ff9b::a00:5", "::127.0.0.1",
    ],
)  # fmt: skip
def test_non_public_addresses(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses(address):
    assert is_public(ipaddress.ip_address(address))


def test_loopback_is_refused_unless_allow_listed(server, connections):
    with pytest.raises(ImageDownloadError, match="non-public address"):
        load(f"{server}/ok.png", allow_networks=[])
    assert connections == [] and _Handler.hosts == []
    assert load(f"{server}/ok.png", allow_networks=["127.0.0.0/8"]).size == (40, 30)


@pytest.mark.parametrize(
    "table",
    [
        {"evil.test": ["10.0.0.5"]},
        {"evil.test": ["169.254.169.254"]},
        {"evil.test": ["::ffff:10.0.0.5"]},
        {"evil.test": ["93.184.216.34", "10.0.0.5"]},  # one bad answer is enough
    ],
)
def test_hostname_resolving_to_a_private_address_is_refused_before_connecting(table, connections):
    resolve = fake_dns(table)
    with pytest.raises(ImageDownloadError, match="'evil.test' points to a loopback, private, link-local"):
        load("https://evil.test/cat.jpg", resolve=resolve, allow_networks=[])
    assert resolve.lookups == ["evil.test"]
    assert connections == []


def test_metadata_address_literal_is_refused(connections):
    with pytest.raises(ImageDownloadError, match="non-public address"):
        load("http://169.254.169.254/latest/meta-data/", allow_networks=[])
    assert connections == []


@pytest.mark.parametrize(
    "target",
    ["http://evil.test/x.png", "http://169.254.169.254/latest/meta-data/", "http://[::ffff:10.0.0.5]/x.png"],
)
def test_every_redirect_hop_is_checked_again(server, target, connections):
    with pytest.raises(ImageDownloadError, match="non-public address"):
        load(f"{server}/redirect?{urllib.parse.quote(target)}", resolve=fake_dns({"evil.test": ["10.0.0.5"]}))
    assert connections == ["127.0.0.1"]  # the first hop only


def test_allow_listed_hostname_and_redirect_to_a_refused_literal(server, connections):
    port = server.rsplit(":", 1)[1]
    resolve = fake_dns({"img.test": ["127.0.0.1"]})
    only_host = {"allow_networks": [], "allow_hosts": ["IMG.test"], "resolve": resolve}
    assert load(f"http://img.test:{port}/redirect?/ok.png", **only_host).size == (40, 30)
    assert load(f"{server}/redirect?http://img.test:{port}/ok.png", allow_hosts=["img.test"], resolve=resolve)
    with pytest.raises(ImageDownloadError, match="'127.0.0.1' points to"):
        load(f"http://img.test:{port}/redirect?http://127.0.0.1:{port}/ok.png", **only_host)


def test_connects_to_the_checked_address_without_resolving_again(server, connections):
    """DNS rebinding: a second lookup would answer 10.0.0.5; there must not be one."""
    port = server.rsplit(":", 1)[1]
    answers = iter([["127.0.0.1"], ["10.0.0.5"]])

    async def rebinding(host, port):
        return next(answers)

    assert load(f"http://img.test:{port}/ok.png", resolve=rebinding).size == (40, 30)
    assert connections == ["127.0.0.1"]
    assert _Handler.hosts == [f"img.test:{port}"]  # the server still sees the real hostname


# --- https: connect to the checked IP, verify the certificate against the hostname (SNI) ---------


def _self_signed(name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return cert.public_bytes(pem), key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    cert, key = _self_signed("img.test")
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert)
    (folder / "key.pem").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    sni = []
    context.sni_callback = lambda sock, name, ctx: sni.append(name)
    srv = _serve(lambda sock: context.wrap_socket(sock, server_side=True))
    yield srv.server_address[1], ssl.create_default_context(cadata=cert.decode()), sni
    srv.shutdown()


def test_https_sends_sni_and_verifies_the_hostname_at_the_checked_ip(tls_server, connections):
    port, trust, sni = tls_server
    resolve = fake_dns({"img.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    assert load(f"https://img.test:{port}/ok.png", resolve=resolve, verify=trust).size == (40, 30)
    assert sni[-1] == "img.test" and _Handler.hosts == [f"img.test:{port}"]
    assert connections == ["127.0.0.1"]
    # The same IP under a name the certificate does not cover: verification fails, nothing is fetched.
    with pytest.raises(ImageDownloadError, match="Could not connect.*certificate verify failed"):
        load(f"https://other.test:{port}/ok.png", resolve=resolve, verify=trust)
    assert _Handler.hosts == [f"img.test:{port}"]
