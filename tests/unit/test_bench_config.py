"""loadtest/bench.py's llava-serve config: the shipped one in production's layout, with nothing of the per-key
limits left in the way. Its status polls (wrk, 32 connections) reach about a thousand a second against one
replica; a read budget left at its default (100 a second per key) would answer most of them 429 and stop the
benchmark, as it did once the budget was added."""

from __future__ import annotations

import sys

from serve.config import load_config
from tests.conftest import CONFIGS, ROOT

sys.path.insert(0, str(ROOT / "loadtest"))
import bench  # noqa: E402


def test_the_bench_runs_the_shipped_config_in_production_layout_without_per_key_limits(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"- {{key: {bench.KEY}, name: bench}}\n")
    path = bench.our_config(CONFIGS / "local-cpu.yaml", tmp_path, keys, "haproxy", "redis://127.0.0.1:6390/0",
                            "http://127.0.0.1:8123")
    cfg = load_config(path, env={})
    shipped = load_config(CONFIGS / "local-cpu.yaml", env={})

    assert cfg.http.proxy == "haproxy" and cfg.store.backend == "redis"
    assert cfg.auth.keys_file == keys
    assert cfg.reads.per_second >= 10**6 and cfg.reads.burst >= 10**6
    # Everything else is the shipped config's: the engine both servers run is the same.
    assert cfg.engine == shipped.engine and cfg.engine_deployment == shipped.engine_deployment
    assert cfg.ingress == shipped.ingress and cfg.jobs == shipped.jobs
