"""docs/configuration.md is what serve/config_docs.py generates, and it covers every config field."""

from serve import config_docs
from serve.auth import KeyEntry
from serve.config import ServeConfig
from tests.conftest import ROOT

DOC = ROOT / "docs" / "configuration.md"


def test_committed_doc_is_current():
    assert DOC.read_text() == config_docs.render(), "docs/configuration.md is stale: run `make config-docs`"


def test_check_mode_names_the_make_target(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    assert config_docs.main(["--check", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "make config-docs" in err and len(err.strip().splitlines()) == 1
    stale.write_text(config_docs.render())
    assert config_docs.main(["--check", str(stale)]) == 0


def test_every_field_has_a_description():
    missing = [
        f"{model.__name__}.{name}"
        for model in [*config_docs.models(ServeConfig), KeyEntry]
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert not missing, f"fields without a description (Field(description=...)): {missing}"


def test_every_field_path_is_documented():
    doc = config_docs.render()
    paths = [p for p, _, _ in config_docs.fields(ServeConfig)] + [p for p, _, _ in config_docs.fields(KeyEntry)]
    assert "engine_deployment.autoscaling.min_replicas" in paths
    # A nested group is a section heading; every other field is a table row.
    missing = [p for p in paths if f"| `{p}`" not in doc and f"\n## {p}\n" not in doc]
    assert not missing, missing


def test_rendering_is_readable_and_deterministic():
    doc = config_docs.render()
    assert doc == config_docs.render()
    assert '`"serve" \\| "haproxy"`' in doc  # Literal, with the table's | escaped
    assert "`float \\| None`" in doc
    assert "`jobs.runner_poll_interval_s` (deprecated)" in doc
    for env, path in (("PORT", "http.port"), ("LLAVA_SERVE_HOST", "http.host"),
                      ("LLAVA_SERVE_KEYS_FILE", "auth.keys_file")):
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{path}` "))
        assert row.endswith(f"| `{env}` |")
