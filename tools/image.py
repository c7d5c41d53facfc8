"""Build and run the images with Docker when a daemon answers, else daemonless (buildah + podman).

    python3 tools/image.py build cpu|gpu [--tag T]     # make image-cpu / image-gpu
    python3 tools/image.py run cpu [--port P]         # make run-image-cpu (Ctrl-C stops it)

Daemonless builds need what this kind of machine lacks (docs/images.md): no registry may be reachable,
so the base image is a stand-in of the same name, built with debootstrap from the machine's Debian mirror;
pip inside the build uses the machine's own pip configuration (its indexes, local wheels and CA bundle,
mounted read-only); containers run under runc with raised default ulimits (tools/containers.conf).
Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "gpu": ROOT / "docker" / "Dockerfile.gpu"}
TAGS = {"cpu": "llava-serve-cpu:0.1.0", "gpu": "llava-serve-gpu:0.1.0"}
CONTAINERS_CONF = ROOT / "tools" / "containers.conf"
BUILD_DIR = "/run/llava-build"  # where a daemonless build sees its generated pip configuration
DEBIAN_MIRROR = "http://deb.debian.org/debian"


@functools.cache  # asked before every container command: `docker info` once per process
def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def base_image(dockerfile: Path) -> str:
    match = re.search(r"^FROM\s+(\S+)", dockerfile.read_text(), re.M)
    assert match, f"{dockerfile} has no FROM"
    name = match.group(1)
    return name if "/" in name.split(":")[0] else f"docker.io/library/{name}"


def have_image(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], env=podman_env(), check=False).returncode == 0


def standin_base(name: str) -> None:
    """The official Python base's stand-in: Debian bookworm (minbase) with Debian's python3, and /usr/local a
    venv so that /usr/local/bin/python and pip exist as in the official image. Its Python patch version is
    Debian's, not the official image's; real builds use the real base."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llava-base-") as tmp:
        root = Path(tmp) / "root"
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root), DEBIAN_MIRROR], check=True,
                       stdout=subprocess.DEVNULL)
        shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
        setup = ("apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
                 "python3 python3-venv ca-certificates && python3 -m venv /usr/local && apt-get clean "
                 "&& rm -rf /var/lib/apt/lists/*")
        subprocess.run(["chroot", str(root), "/bin/sh", "-c", setup], check=True, stdout=subprocess.DEVNULL)
        (root / "etc" / "resolv.conf").unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "--change", "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin"
                        ":/sbin:/bin", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", name],
                       stdin=tar.stdout, env=podman_env(), check=True, stdout=subprocess.DEVNULL)
        assert tar.wait() == 0
    print(f"image: stand-in base {name} built in {time.monotonic() - started:.0f} s", flush=True)


# What the GPU build keeps of the machine's pip settings: how to reach PyPI, never other sources (local CPU
# torch wheels would stand in for PyPI's CUDA build, which docker/constraints-gpu.txt locks).
REACH_ONLY = {"cert", "client-cert", "default-timeout", "timeout", "proxy", "index-url", "trusted-host"}


def pip_config(kind: str) -> tuple[str, list[str]]:
    """This machine's pip settings (files and PIP_* variables, as `pip config list` merges them) as one config
    file, and the local paths they name, to mount read-only into the build. The CPU build's retries are off:
    an index it cannot reach would cost seconds per package."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    if kind == "gpu":
        settings = {k: v for k, v in settings.items() if k in REACH_ONLY}
    else:
        settings["retries"] = "0"
    paths = set()
    for value in settings.values():
        for word in value.split():
            path = word.removeprefix("file://")
            if path.startswith("/") and Path(path).exists():
                # A file:// index's pages link to files beside it: mount the index's whole tree.
                paths.add(str(Path(path).parent) if word.startswith("file://") and Path(path).is_dir() else path)
    text = "[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items()))
    return text, sorted(paths)


def build(kind: str, tag: str) -> None:
    dockerfile = DOCKERFILES[kind]
    started = time.monotonic()
    if docker_available():
        subprocess.run(["docker", "build", "-f", str(dockerfile), "-t", tag, str(ROOT)], check=True)
    else:
        base = base_image(dockerfile)
        if not have_image(base):
            standin_base(base)
        conf, paths = pip_config(kind)
        with tempfile.TemporaryDirectory(prefix="llava-build-") as tmp:
            (Path(tmp) / "pip.conf").write_text(conf)
            mounts = [f"--volume={tmp}:{BUILD_DIR}:ro"] + [f"--volume={p}:{p}:ro" for p in paths]
            # The machine's pip configuration offers the CPU torch; PyTorch's own index is not reachable.
            args = ["--build-arg", f"PIP_CONFIG_FILE={BUILD_DIR}/pip.conf", "--build-arg", "TORCH_INDEX_URL="]
            # Docker format: OCI image configs have no HEALTHCHECK.
            subprocess.run(["buildah", "bud", "--format", "docker", "--isolation", "chroot", "--network", "host",
                            "--layers", *mounts, *args, "-f", str(dockerfile), "-t", tag, str(ROOT)],
                           env=podman_env(), check=True)
    print(f"image: {tag} built in {time.monotonic() - started:.0f} s, {image_size(tag) / 1e9:.2f} GB", flush=True)


def image_size(tag: str) -> int:
    out = subprocess.run([engine(), "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True,
                         text=True, env=podman_env(), check=True).stdout
    return int(out.strip())


def engine() -> str:
    """The command that runs containers: docker with a daemon, else podman."""
    return "docker" if docker_available() else "podman"


def run_args(tag: str, port: int, name: str | None = None) -> list[str]:
    """`<engine> run` for the CPU image on the host's network at `port` (podman here has no bridge network)."""
    named = ["--name", name] if name else []
    return [engine(), "run", "--rm", *named, "--network", "host", "--shm-size", "1g", "-e", f"PORT={port}", tag]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an image from this checkout")
    b.add_argument("kind", choices=sorted(DOCKERFILES))
    b.add_argument("--tag", help="default: llava-serve-<kind>:0.1.0")
    r = sub.add_parser("run", help="run the CPU image in the foreground (Ctrl-C stops it)")
    r.add_argument("kind", choices=["cpu"])
    r.add_argument("--tag", default=TAGS["cpu"])
    r.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.kind, args.tag or TAGS[args.kind])
        return 0
    return subprocess.run(run_args(args.tag, args.port), env=podman_env(), check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
