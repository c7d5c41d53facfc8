"""fal's Python client pointed here by the environment alone (docs/api.md §5.1(b)): `llava-serve run`
with a TLS listener and a self-signed certificate, and an unchanged app with FAL_RUN_HOST,
FAL_QUEUE_RUN_HOST and SSL_CERT_FILE. Its own stack: the integration stack has stopped by now."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import CONFIGS, LOCAL_KEY, ROOT, free_port

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


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir, tmp_path_factory):
    """`llava-serve run` on a config with TLS; yields (port, certificate); stopped with Ctrl-C."""
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
        yield port, cert
    finally:
        server.send_signal(signal.SIGINT)  # the CLI shuts Serve and its private Ray down
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_plain_http_is_not_served(tls_server):
    port, _ = tls_server
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_unchanged_app_configured_by_environment_only(tls_server):
    port, cert = tls_server
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
