"""`llava-serve check`, run as users run it, on every shipped config and on a broken one."""

import shutil
import subprocess
import sys

import yaml

from tests.conftest import CONFIGS, ROOT

CLI = [sys.executable, "-m", "serve.cli", "check"]


def check(config, env=None):
    import os

    return subprocess.run(
        [*CLI, str(config)], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=180
    )


def test_every_shipped_config_passes(tmp_path):
    # The production keys file is a mounted Secret; point the documented override at the example keys.
    env = {"LLAVA_SERVE_KEYS_FILE": str(CONFIGS / "keys.local.yaml")}
    for config in sorted(CONFIGS.glob("*.yaml")):
        if config.name.startswith("keys."):
            continue
        res = check(config, env)
        assert res.returncode == 0, res.stderr
        assert "OK" in res.stdout


def test_broken_config_fails_by_field(tmp_path):
    data = yaml.safe_load((CONFIGS / "local-cpu.yaml").read_text())
    data["engine"]["max_num_seqs"] = -1
    data["engine_deployment"]["num_cpus"] = "lots"
    data["model"]["source"] = str(tmp_path / "no-model-here")
    shutil.copy(CONFIGS / "keys.local.yaml", tmp_path / "keys.local.yaml")
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(data))
    res = check(tmp_path / "broken.yaml")
    assert res.returncode == 1
    assert "engine.max_num_seqs: Input should be greater than 0 (got -1)" in res.stderr
    assert "engine_deployment.num_cpus: Input should be a valid number" in res.stderr


def test_check_reaches_vllm_and_the_filesystem(tmp_path):
    data = yaml.safe_load((CONFIGS / "local-cpu.yaml").read_text())
    data["engine"]["extra_args"] = {"no_such_vllm_arg": 1}
    data["model"]["source"] = str(tmp_path / "no-model-here")
    data["auth"]["keys_file"] = str(tmp_path / "absent-keys.yaml")
    data["http"].update(tls_certfile="certs/absent.pem", tls_keyfile="certs/absent.key")  # relative to the file
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    res = check(tmp_path / "c.yaml")
    assert res.returncode == 1
    assert "engine: vLLM rejects the engine arguments" in res.stderr and "no_such_vllm_arg" in res.stderr
    assert "model.source: no such directory" in res.stderr
    assert "auth.keys_file: cannot read" in res.stderr
    assert f"http.tls_certfile: no such file {tmp_path / 'certs/absent.pem'}" in res.stderr
