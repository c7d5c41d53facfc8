"""`llava-serve --help` and each command's help read as plain text, with examples; --version; check's errors."""

import pytest

from serve.cli import main

COMMANDS = ("run", "check", "render-k8s", "tiny-model", "capacity", "accept")


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_top_help_describes_the_tool_and_gives_examples(capsys):
    out = help_of(capsys)
    assert "llava-serve serves LLaVA" in out and "examples:" in out
    assert "llava-serve run configs/local-cpu.yaml" in out
    assert "llava-serve check configs/llava-1.5-13b-l40s.yaml" in out and "make serve" in out
    for command in COMMANDS:
        assert command in out
    assert "`" not in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_description_and_an_example(capsys, command):
    out = help_of(capsys, command)
    assert "`" not in out
    usage, _, rest = out.partition("\n\n")
    description = rest.split("\n\n")[0]
    assert usage.startswith(f"usage: llava-serve {command}")
    assert description and not description.startswith(("positional arguments:", "options:"))
    examples = [line for line in out.splitlines() if f"llava-serve {command} " in line
                and not line.startswith("usage:")]
    assert examples, f"{command} --help shows no example"


def test_run_help_names_the_env_overrides_and_shutdown(capsys):
    out = help_of(capsys, "run")
    for env in ("PORT", "LLAVA_SERVE_HOST", "LLAVA_SERVE_KEYS_FILE"):
        assert env in out
    assert "Ctrl-C" in out and "SIGTERM" in out and "drains" in out
    assert "docs/configuration.md" in out  # the config argument's help


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("llava-serve ") and len(out.split()) == 2


def test_check_of_a_missing_file_names_the_path_tried(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["check", "nowhere/absent.yaml"]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and str((tmp_path / "nowhere" / "absent.yaml").resolve()) in err
