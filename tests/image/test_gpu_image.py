"""The GPU image cannot rot silently (docs/images.md): it is built from the checkout like the CPU one (it
cannot run here, with no GPU), its installed set is exactly docker/constraints-gpu.txt (the lock `make
lock-gpu` writes) less what the Dockerfile removes, and inside it `llava-serve check` validates the
production config end to end with vLLM's CUDA build."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import image as images  # noqa: E402

TAG = "llava-serve-gpu:test"
DOCKERFILE = ROOT / "docker" / "Dockerfile.gpu"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    out = {}
    for line in (ROOT / "docker" / "constraints-gpu.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[norm(name)] = version.strip()
    return out


def uninstalled() -> set[str]:
    """What the Dockerfile removes after installing the lock (`pip uninstall -y ...`)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found = re.search(r"pip uninstall -y ([\w .-]+?)(?:&&|$)", text, re.M)
    return {norm(n) for n in found.group(1).split()} if found else set()


@pytest.fixture(scope="module")
def built(report_cost):
    started = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "tools" / "image.py"), "build", "gpu", "--tag", TAG], check=True)
    report_cost(f"GPU image: built in {time.monotonic() - started:.0f} s, {images.image_size(TAG) / 1e9:.2f} GB "
                "(not run: no GPU here)")
    return TAG


def in_image(tag: str, *args: str, entrypoint: str | None = None, **env: str) -> subprocess.CompletedProcess:
    cmd = [images.engine(), "run", "--rm", "--network", "host"]
    cmd += ["--entrypoint", entrypoint] if entrypoint else []
    cmd += [f"--env={k}={v}" for k, v in env.items()]
    return subprocess.run([*cmd, tag, *args], env=images.podman_env(), capture_output=True, text=True, check=False)


def installed(tag: str) -> dict[str, str]:
    listed = in_image(tag, "-m", "pip", "list", "--format", "json", entrypoint="python")
    assert listed.returncode == 0, listed.stderr[-3000:]
    return {norm(p["name"]): p["version"] for p in json.loads(listed.stdout)}


# Run inside the image: each installed package's requirements whose markers hold there, by the name required.
_APPLYING = """
import importlib.metadata as md, json, re
from packaging.requirements import Requirement
out = {}
for dist in md.distributions():
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.setdefault(re.sub(r"[-_.]+", "-", req.name).lower(), []).append(str(req.marker or ""))
print(json.dumps(out))
"""


def standin_only(tag: str, extra: set[str]) -> set[str]:
    """Of packages the lock lacks, those installed only because the base is the stand-in (docs/images.md): its
    Debian Python (3.11.2) is older than the official base's named in FROM, and every requirement that pulled
    them in holds by `python_full_version` alone (redis wants async-timeout below 3.11.3)."""
    base = images.base_image(DOCKERFILE)
    version = in_image(base, "-c", "import platform; print(platform.python_version())", entrypoint="python")
    if version.stdout.strip() == re.search(r":(\d+\.\d+\.\d+)", base).group(1):
        return set()  # the real base: the lock must hold exactly
    applying = json.loads(in_image(tag, "-c", _APPLYING, entrypoint="python").stdout)
    return {n for n in extra if applying.get(n) and all("python_full_version" in m for m in applying[n])}


def test_the_gpu_image_installs_exactly_its_lock(built):
    base = installed(images.base_image(DOCKERFILE))  # the base's own tools (pip, ...), unless the lock has them
    want = {n: v for n, v in locked().items() if n not in uninstalled()}
    have = {n: v for n, v in installed(built).items() if n != "llava-serve" and (n in want or n not in base)}
    for name in standin_only(built, set(have) - set(want)):
        del have[name]
    assert have == want, {"not locked": sorted(set(have) - set(want)),
                          "locked, not installed": sorted(set(want) - set(have)),
                          "other version": sorted(n for n in set(want) & set(have) if want[n] != have[n])}


def test_llava_serve_checks_the_production_config_inside_the_gpu_image(built):
    checked = in_image(built, "check", "/opt/llava-serve/configs/llava-1.5-13b-l40s.yaml",
                       LLAVA_SERVE_KEYS_FILE="/opt/llava-serve/configs/keys.local.yaml")
    assert checked.returncode == 0 and ": OK" in checked.stdout, checked.stdout[-2000:] + checked.stderr[-3000:]
