"""`llava-serve render-k8s`: KubeRay's serveConfigV2 generated from a configs/*.yaml.

The Serve config inside k8s/rayservice.yaml is the one part of k8s/ derived from a config: the config
file's content goes in verbatim as the application's `args.config` (serve.app:app_builder validates it
as `llava-serve run` does), and each deployment's options are listed from the same function that
build_app applies, so operators see replicas, resources and autoscaling in the RayService. The rest of
the manifest is written by hand; tests check it agrees with the config (ports, resources, grace periods).
Rendering imports neither Ray nor vLLM (tests/unit/test_k8s_render.py): `make k8s` runs it from a venv of the
config's dependencies alone (.venv-k8s: pydantic, PyYAML, Pillow).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from serve.config import ServeConfig, parse_config
from serve.deployment import deployment_options

KEY = "serveConfigV2"


def serve_config(raw: dict[str, Any], cfg: ServeConfig) -> dict[str, Any]:
    """The Serve config file (ray.serve.schema.ServeDeploySchema) that runs `cfg` on a Ray cluster."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.http.host, "port": cfg.http.port},
        "applications": [
            {
                "name": cfg.app_name,
                "route_prefix": "/",
                "import_path": "serve.app:app_builder",
                "args": {"config": raw},
                "deployments": [{"name": name, **opts} for name, opts in deployment_options(cfg).items()],
            }
        ],
    }


def render(config_path: Path) -> str:
    """The serveConfigV2 text for a config file (env overrides ignored: the file alone decides)."""
    raw = yaml.safe_load(config_path.read_text())
    cfg = parse_config(raw, config_path.parent.resolve(), env={}, source=str(config_path))
    return yaml.safe_dump(serve_config(raw, cfg), sort_keys=False, width=110)


def replace_block(manifest: str, body: str, key: str = KEY) -> str:
    """`manifest` with the literal block `key: |` holding `body` (the rest of the text untouched)."""
    lines = manifest.splitlines(keepends=True)
    for i, line in enumerate(lines):
        found = re.match(rf"^(\s*){key}: \|[-+]?\s*$", line)
        if found:
            break
    else:
        raise ValueError(f"no '{key}: |' block to fill")
    indent = " " * (len(found.group(1)) + 2)
    end = i + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(indent)):
        end += 1
    while end > i + 1 and not lines[end - 1].strip():  # blank lines after the block are not part of it
        end -= 1
    block = "".join(indent + line if line.strip() else line for line in body.splitlines(keepends=True))
    return "".join(lines[: i + 1]) + block + "".join(lines[end:])
