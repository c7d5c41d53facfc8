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


def test_a_yaml_error_names_the_place_never_the_line(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("- {key: sekret-value-123, name: a}\n- key: other-sekret-456\n  name: [b\n")
    with pytest.raises(ConfigError) as exc:
        KeyRing.load(path, LIMITS)
    assert "not valid YAML at line" in str(exc.value)
    assert "sekret" not in str(exc.value) and "name: [b" not in str(exc.value)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def keyring(tmp_path, clock, *entries: tuple[str, str], every: float = 10.0):
    from serve.auth import Keys
    from serve.config import AuthConfig

    path = tmp_path / "keys.yaml"
    path.write_text("".join(f"- {{key: {key}, name: {name}}}\n" for key, name in entries))
    return Keys(AuthConfig(keys_file=path, reload_interval_s=every), LIMITS, clock), path


def test_a_removed_key_stops_working_within_the_reload_interval(tmp_path):
    clock = Clock()
    keys, path = keyring(tmp_path, clock, ("alpha-key-1", "alpha"), ("beta-key-22", "beta"))
    assert keys.authenticate("beta-key-22").name == "beta"
    path.write_text("- {key: alpha-key-1, name: alpha}\n- {key: gamma-key-333, name: gamma}\n")
    clock.now = 9.9
    assert keys.authenticate("beta-key-22").name == "beta"  # not due yet: the file is not even read
    clock.now = 10.0
    assert keys.authenticate("beta-key-22") is None
    assert keys.authenticate("gamma-key-333").name == "gamma"
    assert keys.authenticate("alpha-key-1").name == "alpha"


def test_a_bad_keys_file_keeps_the_keys_before_it_and_says_so_without_secrets(tmp_path, caplog):
    clock = Clock()
    keys, path = keyring(tmp_path, clock, ("alpha-key-1", "alpha"))
    path.write_text("- {key: leaked-secret-9, name: alpha}\n- {key: leaked-secret-9, name: beta}\n- {key: x\n")
    clock.now = 10.0
    with caplog.at_level("WARNING", logger="serve.auth"):
        assert keys.authenticate("alpha-key-1").name == "alpha"
    assert keys.authenticate("leaked-secret-9") is None
    [record] = [r for r in caplog.records if r.name == "serve.auth"]
    assert "keeping the 1 keys" in record.getMessage() and "leaked-secret" not in record.getMessage()
    path.unlink()  # a file that disappears (a Secret being replaced) keeps the keys too
    clock.now = 20.0
    assert keys.authenticate("alpha-key-1").name == "alpha"
    path.write_text("- {key: fixed-key-777, name: fixed}\n")  # and a good file after a bad one loads
    clock.now = 30.0
    assert keys.authenticate("fixed-key-777").name == "fixed" and keys.authenticate("alpha-key-1") is None
