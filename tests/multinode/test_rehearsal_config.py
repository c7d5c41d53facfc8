"""What the rehearsal (tools/multinode.py) deploys is the serveConfigV2 `render-k8s` writes into the manifest
with only the swaps docs/kubernetes.md lists ("Rehearsing the layout on one machine"). No Ray: it compares
configs."""

from __future__ import annotations

import sys

import yaml

from serve.k8s import render
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import multinode  # noqa: E402

CONFIG = ("applications", "llava", "args", "config")
ENGINE = ("applications", "llava", "deployments", "LLMServer")
SWAPPED = [
    ("http_options", "host"), ("http_options", "port"),  # Serve's address on this machine
    (*CONFIG, "model"), (*CONFIG, "engine"),  # the tiny model, vLLM's CPU settings
    (*CONFIG, "engine_deployment", "num_cpus"), (*CONFIG, "engine_deployment", "num_gpus"),
    (*CONFIG, "engine_deployment", "resources"),  # the GPU's stand-in
    (*CONFIG, "http", "host"), (*CONFIG, "http", "port"), (*CONFIG, "http", "public_base_url"),
    (*CONFIG, "auth", "keys_file"), (*CONFIG, "store", "redis_url"),
    # The engine's options that follow from the above: CPUs, the stand-in, vLLM's CPU environment, and the
    # requests one replica takes (engine.max_num_seqs + max_waiting_requests).
    (*ENGINE, "ray_actor_options"), (*ENGINE, "max_ongoing_requests"),
]


def leaves(tree, path=()) -> dict[tuple, object]:
    """Every value of a nested config by its path; list items named by their `name` where they have one."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in leaves(sub, (*path, key)).items()}
    if isinstance(tree, list) and all(isinstance(i, dict) and "name" in i for i in tree):
        return {k: v for item in tree for k, v in leaves(item, (*path, item["name"])).items()}
    return {path: tree}


def test_the_rehearsal_deploys_the_manifests_serve_config_with_only_the_swaps(tmp_path):
    swaps = {"model": multinode.TINY, "port": 8001, "public_base_url": "http://127.0.0.1:8002",
             "keys_file": tmp_path / "keys.yaml", "redis_url": "redis://127.0.0.1:6380/0"}
    production = leaves(yaml.safe_load(render(multinode.PROD)))
    cfg, submitted = multinode.rehearsal(**swaps)
    ours = leaves(submitted)
    changed = {p for p in production.keys() | ours.keys() if production.get(p) != ours.get(p)}
    assert (*CONFIG, "model", "source") in changed  # the comparison sees the swaps
    # Anything else that differs holds a swapped value where production holds the one it replaces (a copy of
    # the Redis URL in a deployment's options, say).
    values = {str(v) for v in swaps.values()}
    assert [p for p in changed if not any(p[:len(s)] == s for s in SWAPPED) and str(ours.get(p)) not in values] == []
    # What the rehearsal is for stays production's: HAProxy, Redis, the ingress pinned to its group.
    assert (cfg.http.proxy, cfg.store.backend, cfg.ingress.resources) == ("haproxy", "redis", {"llava_ingress": 1})
    assert cfg.engine_deployment.resources == {multinode.GPU_STANDIN: 1} and cfg.engine_deployment.num_gpus == 0
