"""The linters the issue names, on what ships: checkov on k8s/ (and on the Ray pods inside the
RayService, which checkov does not open by itself) and on docker/, hadolint on both Dockerfiles.
Each must pass with only the skips listed, with reasons, in .checkov.yaml and docker/hadolint.yaml."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.conftest import ROOT
from tests.deploy.conftest import LINT_BIN, ray_pods

DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def run(*cmd, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=300)


def checkov(target, framework) -> subprocess.CompletedProcess:
    return run(LINT_BIN / "checkov", "-d", target, "--framework", framework, "--config-file", ROOT / ".checkov.yaml")


def test_checkov_passes_on_k8s():
    res = checkov(ROOT / "k8s", "kubernetes")
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"Passed checks: [1-9]\d*, Failed checks: 0", res.stdout), res.stdout


def test_checkov_passes_on_the_ray_pods(objects, rayservice, tmp_path):
    for name, pod in ray_pods(rayservice).items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**pod, "metadata": {**pod["metadata"],
                                                                                   "namespace": "llava-serve"}}))
    # Beside them, the policies that must select them (CKV2_K8S_6: no pod without a NetworkPolicy).
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    (tmp_path / "networkpolicies.yaml").write_text(yaml.safe_dump_all(policies))
    res = checkov(tmp_path, "kubernetes")
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"Passed checks: [1-9]\d*, Failed checks: 0", res.stdout), res.stdout


def test_checkov_passes_on_docker():
    res = checkov(ROOT / "docker", "dockerfile")
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"Passed checks: [1-9]\d*, Failed checks: 0", res.stdout), res.stdout


def test_checkov_would_catch_a_root_pod(rayservice, tmp_path):
    pod = ray_pods(rayservice)["gpu-l40s"]
    pod["metadata"]["namespace"] = "llava-serve"
    pod["spec"]["securityContext"] = {"runAsUser": 0}
    pod["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    res = checkov(tmp_path, "kubernetes")
    assert res.returncode == 1 and "CKV_K8S_16" in res.stdout  # "Container should not be privileged"


def test_every_checkov_skip_is_justified():
    text = (ROOT / ".checkov.yaml").read_text()
    skipped = yaml.safe_load(text)["skip-check"]
    for check in skipped:
        assert re.search(rf"^\s*# {check} \S.+", text, re.M), f"{check} is skipped without a reason"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    res = run(LINT_BIN / "hadolint", "--config", ROOT / "docker" / "hadolint.yaml", dockerfile)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_would_catch_a_sloppy_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install vllm\nCMD llava-serve run\n")
    res = run(LINT_BIN / "hadolint", "--config", ROOT / "docker" / "hadolint.yaml", bad)
    assert res.returncode == 1
    assert {"DL3007", "DL3013", "DL3025"} <= set(re.findall(r"DL\d{4}", res.stdout)), res.stdout
