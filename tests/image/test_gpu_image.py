"""The GPU image cannot rot silently (docs/images.md): it is not built here (about 10 GB and a GPU to run it),
so pip resolves its Dockerfile's own install command against PyPI, installing nothing, and the set it would
install must be exactly docker/constraints-gpu.txt, the lock `make lock-gpu` writes."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

from tests.conftest import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile.gpu"


def locked() -> dict[str, str]:
    out = {}
    for line in (ROOT / "docker" / "constraints-gpu.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return out


def install_command() -> tuple[list[str], list[str]]:
    """The Dockerfile's `pip install` of the locked set (its requirement and constraint flags), and what it
    uninstalls right after."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    run = next(line for line in text.splitlines() if line.startswith("RUN pip install") and "-c " in line)
    words = shlex.split(run)
    install = words[words.index("install") + 1:words.index("&&")]
    uninstalled = words[words.index("uninstall") + 2:] if "uninstall" in words else []
    return [w for w in install if w != "--no-cache-dir"], uninstalled


def test_the_gpu_dockerfile_installs_exactly_the_lock(tmp_path, report_cost):
    args, uninstalled = install_command()
    assert args[:2] == ["-r", "docker/requirements-gpu.txt"] and "docker/constraints-gpu.txt" in args, args
    # As the image's pip sees it: PyPI alone (this machine's CPU torch wheels must not stand in), with the
    # image's interpreter and platform, which are this venv's (CPython 3.11, x86_64 Linux).
    assert sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64" and sys.platform == "linux"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env["PIP_CONFIG_FILE"] = os.devnull
    report = tmp_path / "report.json"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                    "--report", str(report), *args], cwd=ROOT, env=env, check=True)
    report_cost(f"GPU image: its install resolved against PyPI in {time.monotonic() - started:.0f} s (not built)")
    resolved = {re.sub(r"[-_.]+", "-", p["metadata"]["name"]).lower(): p["metadata"]["version"]
                for p in json.loads(report.read_text())["install"]}
    lock = locked()
    assert resolved == lock, {"not locked": sorted(set(resolved) - set(lock)),
                              "locked, not installed": sorted(set(lock) - set(resolved)),
                              "other version": sorted(n for n in set(resolved) & set(lock) if resolved[n] != lock[n])}
    assert set(uninstalled) <= set(lock), uninstalled  # what it removes after is there to remove
