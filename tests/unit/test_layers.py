"""The package layering (docs/architecture.md, "Packages"): no import cycle between serve modules, and
no upward edge — the job store, engine, media, network and telemetry layers never import the API layer
or the key handling."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "serve"

# module prefix -> prefixes it must never import
FORBIDDEN = {
    "serve.jobs": ("serve.api", "serve.auth", "serve.ingress", "serve.app"),
    "serve.engine": ("serve.api", "serve.jobs", "serve.auth", "serve.ingress", "serve.app"),
    "serve.media": ("serve.api", "serve.jobs", "serve.auth", "serve.ingress", "serve.app"),
    "serve.net": ("serve.api", "serve.jobs", "serve.media", "serve.auth", "serve.ingress", "serve.app"),
    "serve.telemetry": ("serve.api", "serve.jobs", "serve.auth", "serve.ingress", "serve.app"),
    "serve.config": ("serve.api", "serve.jobs", "serve.auth", "serve.engine", "serve.media", "serve.ingress"),
    # The capacity model is arithmetic on the config: it runs without Ray, vLLM or the service.
    "serve.capacity": ("serve.api", "serve.jobs", "serve.auth", "serve.engine", "serve.media", "serve.net",
                       "serve.telemetry", "serve.webhooks", "serve.ingress", "serve.app", "serve.k8s", "serve.cli"),
    # The deployments' options and Ray's environment are plain data from the config, and rendering the
    # RayService needs nothing else: `make k8s` runs from a venv without Ray or vLLM (.venv-k8s).
    "serve.deployment": ("serve.api", "serve.jobs", "serve.auth", "serve.engine", "serve.media", "serve.net",
                         "serve.telemetry", "serve.webhooks", "serve.ingress", "serve.app", "serve.k8s", "serve.cli"),
    # The acceptance check is a client of a deployment, over HTTP: it runs nothing of the service.
    "serve.accept": ("serve.api", "serve.jobs", "serve.auth", "serve.engine", "serve.media", "serve.net",
                     "serve.telemetry", "serve.webhooks", "serve.ingress", "serve.app", "serve.k8s"),
    "serve.k8s": ("serve.api", "serve.jobs", "serve.auth", "serve.engine", "serve.media", "serve.net",
                  "serve.telemetry", "serve.webhooks", "serve.ingress", "serve.app", "serve.cli"),
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """serve module -> the serve modules it imports (anywhere in the file: a function-level import is
    still an edge)."""
    modules = {_module(p): p for p in SERVE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_the_graph_is_read():
    graph = import_graph()
    assert "serve.api.fal.routes" in graph["serve.ingress"]
    assert "serve.jobs.models" in graph["serve.jobs.failures"]


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_upward_edge():
    bad = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for lower, banned in FORBIDDEN.items()
        if module == lower or module.startswith(lower + ".")
        for target in targets
        if any(target == b or target.startswith(b + ".") for b in banned)
    ]
    assert not bad, bad
