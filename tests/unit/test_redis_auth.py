"""Redis' password reaches the job store's client from the environment (LLAVA_SERVE_REDIS_PASSWORD: on
Kubernetes the Secret llava-redis-auth), never from the config, which the RayService holds in clear
(docs/kubernetes.md). Nothing connects: the client's connection settings are read as made."""

from __future__ import annotations

import yaml

from serve.config import ENV_REDIS_PASSWORD, parse_config
from serve.jobs.factory import build_store
from serve.jobs.redis_store import RedisBackend
from tests.conftest import CONFIGS


def password_of(backend: RedisBackend) -> str | None:
    return backend._redis().connection_pool.connection_kwargs.get("password")


def prod_store(monkeypatch, password: str | None, url: str = "redis://llava-redis:6379/0") -> RedisBackend:
    data = yaml.safe_load((CONFIGS / "llava-1.5-13b-l40s.yaml").read_text())
    data["store"]["redis_url"] = url
    if password is None:
        monkeypatch.delenv(ENV_REDIS_PASSWORD, raising=False)
    else:
        monkeypatch.setenv(ENV_REDIS_PASSWORD, password)
    backend = build_store(parse_config(data, CONFIGS, env={}))._backend
    assert isinstance(backend, RedisBackend)
    return backend


def test_the_store_authenticates_with_the_password_from_the_environment(monkeypatch):
    assert password_of(prod_store(monkeypatch, "a-long-random-secret-0123456789")) == "a-long-random-secret-0123456789"


def test_without_it_the_store_sends_none(monkeypatch):
    assert password_of(prod_store(monkeypatch, None)) is None
    assert password_of(prod_store(monkeypatch, "")) is None  # an empty variable is no password


def test_a_password_in_the_url_wins(monkeypatch):
    backend = prod_store(monkeypatch, "from-the-environment", url="redis://:from-the-url@llava-redis:6379/0")
    assert password_of(backend) == "from-the-url"

