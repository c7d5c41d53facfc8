"""fal's Python client pointed here by the environment alone (docs/api.md §5.1(b)): `llava-serve run`
with a TLS listener and a self-signed certificate, and an unchanged app with FAL_RUN_HOST,
FAL_QUEUE_RUN_HOST and SSL_CERT_FILE. Its own stack: the integration stack has stopped by now.

The same `llava-serve run` is the development console (configs/local-cpu.yaml, telemetry.log_format
text; serve/telemetry/console.py): the last tests read what it printed, and stop it."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import requests
import yaml

from tests.conftest import CONFIGS, LOCAL_KEY, ROOT, data_uri, free_port

HERE = Path(__file__).parent


def self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class TlsServer(NamedTuple):
    port: int
    cert: Path
    log: Path  # everything `llava-serve run` printed (stdout and stderr)
    process: subprocess.Popen


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir, tmp_path_factory):
    """`llava-serve run` on a config with TLS; yields a TlsServer; stopped with Ctrl-C."""
    work = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(work)
    port = free_port()
    data = yaml.safe_load((CONFIGS / "local-cpu.yaml").read_text())
    data["model"]["source"] = str(tiny_model_dir)
    data["http"].update(port=port, tls_certfile=str(cert), tls_keyfile=str(key))
    data["auth"]["keys_file"] = str(CONFIGS / "keys.local.yaml")
    config = work / "tls.yaml"
    config.write_text(yaml.safe_dump(data))
    log = (work / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "serve.cli", "run", str(config)], cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items() if k != "PORT"})
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if requests.get(f"https://localhost:{port}/readyz", verify=str(cert), timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llava-serve run did not become ready:\n{(work / 'server.log').read_text()[-4000:]}")
            time.sleep(1)
        yield TlsServer(port, cert, work / "server.log", server)
    finally:
        server.send_signal(signal.SIGINT)  # the CLI shuts Serve and its private Ray down
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_plain_http_is_not_served(tls_server):
    port = tls_server.port
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_unchanged_app_configured_by_environment_only(tls_server):
    port, cert = tls_server.port, tls_server.cert
    env = {**os.environ, "FAL_KEY": LOCAL_KEY, "FAL_RUN_HOST": f"localhost:{port}",
           "FAL_QUEUE_RUN_HOST": f"localhost:{port}/queue", "SSL_CERT_FILE": str(cert)}
    proc = subprocess.run([sys.executable, str(HERE / "unchanged_app.py")], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    for out in [got["run"], got["subscribe"], got["result"], got["async_run"], got["stream"][-1]]:
        assert out["partial"] is False and len(out["output"]) == 8 and out["stats"]["num_output_tokens"] == 8
    assert all(event["partial"] for event in got["stream"][:-1]) and len(got["stream"]) >= 2
    assert got["updates"][-1] == "Completed" and got["status"] == "Completed"


# The development console (serve/telemetry/console.py). Measured: 3 lines before `ready` (what starts, and
# vLLM's Triton notice from each of its two processes, logged before its logging is set up), against 68
# with Ray's and vLLM's defaults.
MAX_LINES_TO_READY = 10
ACCESS_LINE = re.compile(r"^\d\d:\d\d:\d\d 200 POST /fal-ai/llavav15-13b fal run key=local-dev \d+ ms$")


def console(server: TlsServer) -> list[str]:
    return server.log.read_text().splitlines()


def settled(server: TlsServer, quiet_s: float = 2.0) -> int:
    """How many lines the console has once nothing arrived for quiet_s (an earlier test's last lines
    reach it a moment after their requests ended)."""
    count, since = len(console(server)), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.2)
        if (now := len(console(server))) != count:
            count, since = now, time.monotonic()
    return count


def test_console_until_ready_is_a_few_lines(tls_server):
    lines = console(tls_server)
    ready = next(i for i, line in enumerate(lines) if line.startswith("llava-serve: ready on https://"))
    assert lines[0].startswith("llava-serve: starting"), lines[:3]
    # The proxy answers (the fixture's /readyz, the first test) a moment before `ready` is printed.
    starting = [line for line in lines[:ready] if not re.match(r"\d\d:\d\d:\d\d \d{3} [A-Z]+ /", line)]
    assert len(starting) < MAX_LINES_TO_READY, "\n".join(starting)
    # Ray's, Serve's and vLLM's INFO lines and the warnings about the machine are off the console.
    noisy = [line for line in starting if re.search(r"\b(WARNING|INFO|DEBUG)\b|\(raylet\)|pid=", line)]
    assert not noisy, noisy


def test_one_readable_access_line_per_request(tls_server):
    before = settled(tls_server)
    resp = requests.post(f"https://localhost:{tls_server.port}/fal-ai/llavav15-13b", verify=str(tls_server.cert),
                         headers={"Authorization": f"Key {LOCAL_KEY}"}, timeout=60,
                         json={"prompt": "hi", "image_url": data_uri(), "max_new_tokens": 2})
    assert resp.status_code == 200, resp.text
    deadline = time.monotonic() + 10
    while len(console(tls_server)) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    settled(tls_server)  # anything else this request printed has arrived too
    new = console(tls_server)[before:]
    assert len(new) == 1 and ACCESS_LINE.match(new[0]), new
    # The key's name, never the key, anywhere on the console.
    assert LOCAL_KEY not in tls_server.log.read_text()


def test_ctrl_c_stops_cleanly(tls_server):
    """Last in this module: it stops the server."""
    before = settled(tls_server)
    tls_server.process.send_signal(signal.SIGINT)
    assert tls_server.process.wait(timeout=90) == 0
    tail = console(tls_server)[before:]
    assert tail == ["llava-serve: stopping; in-flight requests and running jobs finish first",
                    "llava-serve: stopped"], tail
    assert "Traceback" not in tls_server.log.read_text()
