"""tools/prereqs.sh, the Makefile's first step: on a machine that lacks something, ONE line on stderr naming
what is missing and how to get it, exit status 1; on this machine (which `make test` checked) it passes.

The fakes are shell scripts on a PATH of their own: `python3` prints what the script's one probe of the
interpreter prints ("<major>.<minor> venv", or "-" without ensurepip), `node` a `node --version`, `id` a
user id (so the not-root messages are tested when the tests run as root)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "prereqs.sh"


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def add(name: str, stdout: str = "", rc: int = 0) -> None:
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{stdout}'\nexit {rc}\n")
        path.chmod(0o755)

    add.bin = bin_dir
    return add


def prereqs(fakes, *needs: str, python: str = "python3") -> subprocess.CompletedProcess:
    env = {"PATH": str(fakes.bin), "PYTHON": python}
    return subprocess.run(["/bin/sh", str(SCRIPT), "--make", "test", *needs], env=env, capture_output=True,
                          text=True, timeout=30)


def one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava-serve: make test needs "), result.stderr
    return lines[0]


def test_python_of_another_version(fakes):
    fakes("python3", "3.12 venv")
    line = one_line(prereqs(fakes, "python"))
    assert "Python 3.11 as $(PYTHON) (found 3.12 at python3)" in line
    assert "install CPython 3.11" in line and line.endswith("run make PYTHON=python3.11 test")


def test_python_of_another_version_with_python311_on_path(fakes):
    fakes("python3", "3.10 venv")
    fakes("python3.11", "3.11 venv")
    line = one_line(prereqs(fakes, "python"))
    assert line == "llava-serve: make test needs Python 3.11 as $(PYTHON) (found 3.10 at python3): " \
                   "run make PYTHON=python3.11 test"


def test_python_absent(fakes):
    line = one_line(prereqs(fakes, "python"))
    assert "(python3: not found)" in line and "python3.11-venv" in line


def test_python_that_does_not_run(fakes):
    fakes("python3", "", rc=127)  # e.g. a pyenv shim for a version not installed
    assert "(python3 does not run)" in one_line(prereqs(fakes, "python"))


def test_python_without_venv(fakes):
    fakes("python3", "3.11 -")
    line = one_line(prereqs(fakes, "python"))
    assert "with venv (python3 has no ensurepip)" in line and line.endswith("sudo apt-get install python3.11-venv")


def test_the_python_named_by_PYTHON_is_checked(fakes):
    fakes("python3", "3.12 venv")
    fakes("python3.11", "3.11 venv")
    assert prereqs(fakes, "python", python="python3.11").returncode == 0


@pytest.mark.parametrize("version", ["v16.20.2", "v17.9.1"])
def test_old_node(fakes, version):
    fakes("node", version)
    fakes("npm", "10.0.0")
    line = one_line(prereqs(fakes, "node"))
    assert line == f"llava-serve: make test needs Node.js >= 18 with npm (https://nodejs.org): found {version}"


def test_node_absent(fakes):
    line = one_line(prereqs(fakes, "node"))
    assert line == "llava-serve: make test needs Node.js >= 18 with npm (https://nodejs.org): node not found"


def test_node_without_npm(fakes):
    fakes("node", "v18.0.0")
    assert "found node v18.0.0 but not npm" in one_line(prereqs(fakes, "node"))


def test_node_18_and_later_with_npm(fakes):
    fakes("npm", "9.0.0")
    for version in ("v18.0.0", "v20.20.2", "v100.1.0"):
        fakes("node", version)
        assert prereqs(fakes, "node").returncode == 0, version


def test_apt_tools_absent_and_not_root(fakes):
    fakes("id", "1000")
    fakes("apt-get")
    line = one_line(prereqs(fakes, "redis-server"))
    assert line.startswith("llava-serve: make test needs redis-server for the Redis store tests (redis-server not found; "
                           "the Makefile's apt-get install needs root): ")
    assert line.endswith("sudo apt-get install -y --no-install-recommends redis-server")


def test_image_tools_name_what_is_missing(fakes):
    fakes("id", "1000")
    fakes("buildah")
    fakes("runc")
    line = one_line(prereqs(fakes, "image-tools"))
    assert "(podman, debootstrap not found;" in line
    assert line.endswith("sudo apt-get install -y --no-install-recommends buildah podman runc debootstrap")


def test_image_tools_from_a_docker_daemon(fakes):
    fakes("id", "1000")
    fakes("docker")  # `docker info` answers
    assert prereqs(fakes, "image-tools").returncode == 0


def test_apt_tools_installable_as_root(fakes):
    fakes("id", "0")
    fakes("apt-get")
    assert prereqs(fakes, "redis-server", "image-tools", "wrk").returncode == 0


def test_root_without_apt(fakes):
    fakes("id", "0")
    assert "no apt-get): install wrk with its package manager" in one_line(prereqs(fakes, "wrk"))


def test_apt_tools_present(fakes):
    fakes("id", "1000")
    for tool in ("redis-server", "buildah", "podman", "runc", "debootstrap"):
        fakes(tool)
    assert prereqs(fakes, "redis-server", "image-tools").returncode == 0


def test_only_the_first_missing_need_is_named(fakes):
    fakes("python3", "3.12 venv")
    fakes("node", "v16.0.0")
    fakes("id", "1000")
    line = one_line(prereqs(fakes, "python", "node", "redis-server"))
    assert "Python 3.11" in line


def test_unknown_need(fakes):
    result = prereqs(fakes, "cobol")
    assert result.returncode == 1 and "unknown need 'cobol'" in result.stderr


def test_this_machine_has_what_make_test_checked():
    # What `make test` checks (Makefile: test-prereqs) with the real PATH; this interpreter is the venv's.
    result = subprocess.run(["/bin/sh", str(SCRIPT), "--make", "test", "python", "node", "redis-server",
                             "image-tools"], env={"PATH": os.environ["PATH"], "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_the_makefile_checks_before_installing():
    text = (ROOT / "Makefile").read_text()
    assert "\ntest: test-prereqs " in text  # first: make builds prerequisites in order
    assert "{ $(PREREQS) python && $(PYTHON) -m venv $(VENV); }" in text
    for tool in ("redis-server", "image-tools", "wrk"):
        assert f"{{ $(PREREQS) {tool} && apt-get update" in text, tool

