import pytest

from serve.auth import KeyRing
from serve.config import ConfigError, LimitsConfig
from tests.conftest import CONFIGS

LIMITS = LimitsConfig(rate_per_minute=60, max_concurrent=10)


def test_local_keys_file_loads_with_defaults_and_overrides():
    ring = KeyRing.load(CONFIGS / "keys.local.yaml", LIMITS)
    dev = ring.authenticate("local-test-key")
    assert dev is not None and dev.name == "local-dev"
    assert (dev.limits.rate_per_minute, dev.limits.max_concurrent) == (60, 10)
    burst = ring.authenticate("local-burst-key")
    assert (burst.limits.rate_per_minute, burst.limits.max_concurrent) == (600, 32)


@pytest.mark.parametrize("presented", ["", "local-test-ke", "local-test-key ", "LOCAL-TEST-KEY", "x" * 1000])
def test_unknown_keys_are_refused(presented):
    assert KeyRing.load(CONFIGS / "keys.local.yaml", LIMITS).authenticate(presented) is None


def test_caller_never_carries_the_key():
    caller = KeyRing.load(CONFIGS / "keys.local.yaml", LIMITS).authenticate("local-test-key")
    assert "local-test-key" not in repr(caller) and "local-test-key" not in caller.model_dump_json()


@pytest.mark.parametrize(
    "content, expected",
    [
        ("- {key: aaaaaaaa, name: a}\n- {key: bbbbbbbb, name: a}\n", "key names must be unique"),
        ("- {key: aaaaaaaa, name: a}\n- {key: aaaaaaaa, name: b}\n", "keys must be unique"),
        ("- {key: short, name: a}\n", "at least 8 characters"),
        ("- {key: aaaaaaaa, name: a, max_concurrent: 0}\n", "greater than 0"),
        ("- {key: aaaaaaaa}\n", "Field required"),
    ],
)
def test_bad_keys_files_fail_without_echoing_secrets(tmp_path, content, expected):
    path = tmp_path / "keys.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as exc:
        KeyRing.load(path, LIMITS)
    assert expected in str(exc.value)
    assert "aaaaaaaa" not in str(exc.value) and "short" not in str(exc.value).replace("shorter", "")
