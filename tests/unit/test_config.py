from pathlib import Path

import pytest
import yaml

from serve.api.chat import single_turn
from serve.config import ConfigError, load_config, parse_config
from tests.conftest import CONFIGS


def test_shipped_configs_load_with_resolved_paths():
    local = load_config(CONFIGS / "local-cpu.yaml", env={})
    assert Path(local.model.source).is_absolute() and local.model.source.endswith(".cache/tiny-llava")
    assert local.auth.keys_file == (CONFIGS / "keys.local.yaml").resolve()
    assert local.http.host == "127.0.0.1" and local.http.port == 8000

    prod = load_config(CONFIGS / "llava-1.5-13b-l40s.yaml", env={})
    assert prod.model.source == "llava-hf/llava-1.5-13b-hf"  # a repo id stays a repo id
    assert prod.model.dtype == "float16" and prod.store.backend == "redis"
    assert prod.engine_deployment.num_gpus == 1


def test_engine_ongoing_requests_are_a_full_batch_and_vllms_queue():
    prod = load_config(CONFIGS / "llava-1.5-13b-l40s.yaml", env={})
    assert prod.engine.max_num_seqs == 20 and prod.engine_deployment.max_waiting_requests == 64
    assert prod.engine_max_ongoing_requests() == 20 + 64


def test_env_overrides_port_host_and_keys_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"PORT": "9123", "LLAVA_SERVE_HOST": "0.0.0.0", "LLAVA_SERVE_KEYS_FILE": "my-keys.yaml"}
    cfg = load_config(CONFIGS / "local-cpu.yaml", env=env)
    assert (cfg.http.host, cfg.http.port) == ("0.0.0.0", 9123)
    assert cfg.auth.keys_file == tmp_path / "my-keys.yaml"  # relative to where the command runs


def _raw() -> dict:
    return yaml.safe_load((CONFIGS / "local-cpu.yaml").read_text())


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["engine"].update(max_num_seqs=0), "engine.max_num_seqs: Input should be greater than 0"),
        (lambda d: d["engine"].update(max_num_seq=4), "engine.max_num_seq: Extra inputs are not permitted"),
        (lambda d: d["model"].update(dtype="fp17"), "model.dtype: Input should be"),
        (lambda d: d.pop("auth"), "auth: Field required"),
        (
            lambda d: d["engine_deployment"].update(autoscaling={"max_replicas": 2, "target_ongoing_requests": 17}),
            "(top level): Value error, engine_deployment.autoscaling.target_ongoing_requests (17) must not exceed "
            "engine.max_num_seqs (16)",
        ),
        (lambda d: d["store"].update(backend="redis"), "store: Value error, redis_url is required"),
        (
            lambda d: d["http"].update(proxy="haproxy", tls_certfile="c.pem", tls_keyfile="k.pem"),
            "http: Value error, TLS needs proxy: serve (Ray's HAProxy ingress speaks plain HTTP)",
        ),
        (
            lambda d: d["engine_deployment"].update(autoscaling={"min_replicas": 3, "max_replicas": 2,
                                                                 "target_ongoing_requests": 4}),
            "engine_deployment.autoscaling: Value error, min_replicas must not exceed max_replicas",
        ),
    ],
)
def test_errors_name_the_field(mutate, expected):
    data = _raw()
    mutate(data)
    with pytest.raises(ConfigError) as exc:
        parse_config(data, CONFIGS, env={})
    assert any(e.startswith(expected) for e in exc.value.errors), exc.value.errors


def test_bad_yaml_and_missing_file_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml", env={})


def test_prompt_template_is_llava_v1_and_keeps_braces():
    text = single_turn("What is {this}?")
    assert text.endswith("USER: <image>\nWhat is {this}? ASSISTANT:")
    assert text.startswith("A chat between a curious human and an artificial intelligence assistant.")


def test_only_the_haproxy_ingress_changes_rays_environment():
    from serve.deployment import ray_env

    data = _raw()
    assert ray_env(parse_config(data, CONFIGS, env={})) == {}  # Serve's own proxy: Ray's defaults
    data["http"].update(proxy="haproxy", public_base_url="https://llava.example.com")
    env = ray_env(parse_config(data, CONFIGS, env={}))
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def test_the_haproxy_ingress_lets_the_largest_admitted_image_reach_the_engine():
    # One gRPC message per request to the engine replica (docs/architecture.md, "Engine"): its cap follows
    # the intake's pixel cap (RGB, 3 bytes a pixel) and the body cap (everything else a request carries).
    from serve.deployment import ray_env

    data = _raw()
    data["http"].update(proxy="haproxy", public_base_url="https://llava.example.com")
    for pixels in (40_000_000, 100_000_000):
        data["media"].update(max_image_pixels=pixels, decode_memory_bytes=20 * pixels)
        cfg = parse_config(data, CONFIGS, env={})
        cap = int(ray_env(cfg)["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"])
        assert cap >= 3 * pixels + cfg.http.max_body_bytes > 4 * 1024 * 1024


# --- http.public_base_url ----------------------------------------------------------------------------------


def _http_errors(**http) -> list[str]:
    data = _raw()
    data["http"].update(http)
    try:
        parse_config(data, CONFIGS, env={})
    except ConfigError as exc:
        return exc.errors
    return []


def test_haproxy_requires_a_public_base_url():
    # TLS ends in front of HAProxy: without it, answers would point clients (and their keys) at http://.
    (error,) = _http_errors(proxy="haproxy")
    assert error.startswith("http: Value error, public_base_url is required with proxy: haproxy")
    assert "https://llava.example.com" in error  # says what to set
    assert _http_errors(proxy="haproxy", public_base_url=None) == [error]
    assert _http_errors(proxy="haproxy", public_base_url="https://llava.example.com") == []
    assert _http_errors(proxy="serve") == []  # Serve's own proxy may derive URLs from each request


@pytest.mark.parametrize("url", [
    "https://llava.example.com",
    "https://llava.example.com/",
    "https://api.example.com/llava/",  # behind a path prefix
    "http://127.0.0.1:8000",  # a private address, and plain http, are the operator's call
    "https://[2001:db8::1]:8443",
])
def test_public_base_url_takes_absolute_http_urls_verbatim(url):
    data = _raw()
    data["http"].update(proxy="haproxy", public_base_url=url)
    assert parse_config(data, CONFIGS, env={}).http.public_base_url == url


@pytest.mark.parametrize("url, why", [
    ("llava.example.com", "absolute"),
    ("/v1", "absolute"),
    ("", "absolute"),
    ("https://", "absolute"),
    ("https:///path", "absolute"),
    ("ftp://llava.example.com", "absolute"),
    ("javascript:alert(1)", "absolute"),
    ("https://llava.example.com:port", "absolute"),
    ("https://llava.example.com:99999", "absolute"),
    ("https://user:secret@llava.example.com", "credentials"),
    ("https://user@llava.example.com", "credentials"),
    ("https://llava.example.com/?key=1", "credentials, a query"),
    ("https://llava.example.com/#top", "credentials, a query or a fragment"),
])
@pytest.mark.parametrize("proxy", ["serve", "haproxy"])
def test_public_base_url_must_be_an_absolute_http_url(url, why, proxy):
    (error,) = _http_errors(proxy=proxy, public_base_url=url)
    assert error.startswith("http.public_base_url: Value error, public_base_url must"), error
    assert why in error
    if why == "absolute":
        assert "absolute http(s) URL, e.g. https://llava.example.com" in error


def test_the_shipped_production_config_sets_https_base_urls():
    prod = load_config(CONFIGS / "llava-1.5-13b-l40s.yaml", env={})
    assert prod.http.proxy == "haproxy"
    assert prod.http.public_base_url.startswith("https://")
    assert prod.fal.queue_base_url is None  # fal's queue URLs follow the public base URL (docs/api.md §2.5.1)
