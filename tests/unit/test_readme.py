"""The README and docs/ stay true without a live stack: every README block is runnable, set-up or output
(tests/readme_blocks.py; the runnable ones run in tests/integration/test_readme_live.py), set-up blocks name
targets, commands and files that exist, links resolve, and the development keys are the ones documented."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from serve.cli import main as cli
from serve.config import load_config
from tests.readme_blocks import README, ROOT, RUNNABLE, blocks, output_of, shown_json

ALL = blocks()
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {t for line in re.findall(r"^([\w .%/-]+):(?!=)", text, re.M) for t in line.split()}


def test_every_block_is_runnable_setup_or_output():
    assert ALL, "README has no code blocks"
    for b in ALL:
        if b.kind == "run":
            assert b.lang in RUNNABLE, f"{b.id}: mark it <!-- readme: setup --> or make it a runnable example"
        elif b.kind == "output":
            k = ALL.index(b)
            assert k > 0 and ALL[k - 1].kind == "run" and output_of(ALL[k - 1], ALL) is b, b.id
            shown_json(b)  # the live test compares it with the real output
        else:
            assert b.lang == "bash", b.id


@pytest.mark.parametrize("block", [b for b in ALL if b.kind == "setup"], ids=lambda b: b.id)
def test_setup_blocks_name_what_exists(block, capsys):
    targets = make_targets()
    for line in block.code.splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]  # environment settings
        if not words:
            continue
        if words[0] == "make":
            for word in words[1:]:
                if "=" not in word:
                    assert word in targets, f"{block.id}: no make target {word!r}"
        elif words[0] == ".venv/bin/llava-serve":
            with pytest.raises(SystemExit) as help_exit:
                cli([words[1], "--help"])
            assert help_exit.value.code == 0, f"{block.id}: no subcommand {words[1]!r}"
            for arg in words[2:]:
                if arg.endswith((".yaml", ".yml")):
                    load_config(ROOT / arg)  # the config it names exists and loads
        else:
            pytest.fail(f"{block.id}: set-up command {words[0]!r} is not checked by this test")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve(doc):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: link to missing {target}"
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"{doc.name}: no heading for #{anchor} in {path or doc.name}"


def test_prerequisites_come_first_and_the_sample_image_is_there():
    sections = re.findall(r"^## (.+)$", README.read_text(), re.M)
    assert sections[:2] == ["Prerequisites", "Quick start"]
    assert (ROOT / "examples/sample.jpg").stat().st_size > 1000


def test_the_development_keys_table_is_the_keys_file():
    cfg = load_config(ROOT / "configs/local-cpu.yaml")
    keys = yaml.safe_load((ROOT / "configs/keys.local.yaml").read_text())
    text = README.read_text()
    for entry in keys:
        rate = entry.get("rate_per_minute", cfg.limits.rate_per_minute)
        conc = entry.get("max_concurrent", cfg.limits.max_concurrent)
        row = re.search(rf"^\| `{re.escape(entry['key'])}` \| `{re.escape(entry['name'])}` \| (\d+) \| (\d+)", text, re.M)
        assert row, f"README's keys table lacks {entry['key']}"
        assert (int(row.group(1)), int(row.group(2))) == (rate, conc), entry["key"]
