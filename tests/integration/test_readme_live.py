"""Every example in the README, run as a reader runs it, against the live stack (tests/readme_blocks.py).

Each runs in a fresh folder holding the checkout's `examples/` (what "from the checkout" gives a reader), with
`node_modules` of the locked JS clients beside a JS example, and only the port changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import JS_CLIENTS
from tests.readme_blocks import BASE_URL, ROOT, blocks, matches, output_of, shown_json

ALL = blocks()
RUN = [b for b in ALL if b.kind == "run"]


def command(lang: str, folder) -> list[str]:
    if lang == "python":
        return [sys.executable, str(folder / "example.py")]
    if lang == "js":
        (folder / "node_modules").symlink_to(JS_CLIENTS / "node_modules")
        return ["node", str(folder / "example.mjs")]
    return ["bash", "-e", "-o", "pipefail", str(folder / "example.sh")]


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_readme_example_runs_as_written(block, stack, tmp_path, report_cost):
    assert BASE_URL in block.code, "an example that does not call the server tests nothing"
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    name = {"python": "example.py", "js": "example.mjs", "bash": "example.sh"}[block.lang]
    (tmp_path / name).write_text(block.code.replace(BASE_URL, stack))
    start = time.monotonic()
    proc = subprocess.run(command(block.lang, tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
    report_cost(f"README example {block.id}: {time.monotonic() - start:.1f} s")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stdout.strip(), f"printed nothing; stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    shown = output_of(block, ALL)
    if shown is not None:
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert matches(shown_json(shown), got), f"the README shows {shown.code}but the example printed {got}"


def test_every_api_and_client_has_a_runnable_example():
    code = "\n".join(b.code for b in RUN)
    for what in ("/fal-ai/llavav15-13b", "import fal_client", '"@fal-ai/client"', "/v1/prediction/",
                 "import requests", '"@eachlabs/aiflow"', "from openai import OpenAI", 'from "openai"'):
        assert what in code, f"no runnable README example has {what}"
