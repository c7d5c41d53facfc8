"""The README's fenced code blocks, as the tests that keep them true read them.

Every block is one of three kinds. A `bash`, `python` or `js` block is an example a reader runs against the
served stack: tests/integration/test_readme_live.py runs each as written, but for the port. A block right
after the line `<!-- readme: setup -->` is shell set-up (installing, serving), which cannot run inside the
suite: tests/unit/test_readme.py checks that the targets, commands and files it names exist. A block right
after `<!-- readme: output -->` is what the example before it prints, checked against the real output.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = ("bash", "python", "js")
BASE_URL = "http://127.0.0.1:8000"  # where the README's examples send their requests
_MARK = re.compile(r"<!-- readme: (setup|output) -->")


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    kind: str  # "run", "setup" or "output"
    line: int  # of the opening fence, 1-based
    heading: str  # the section it is in

    @property
    def id(self) -> str:
        return f"{self.heading}:{self.line}:{self.lang}"


def blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).splitlines()
    found: list[Block] = []
    heading, mark, i = "", None, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if m := _MARK.fullmatch(line.strip()):
            mark = m.group(1)
        elif line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            found.append(Block(line[3:].strip(), "\n".join(lines[i + 1:end]) + "\n", mark or "run", i + 1, heading))
            mark, i = None, end
        elif line.strip():
            mark = None  # a mark belongs to the block right after it
        i += 1
    return found


def output_of(block: Block, all_blocks: list[Block]) -> Block | None:
    """The output block that shows what `block` prints, if the README shows it."""
    k = all_blocks.index(block)
    nxt = all_blocks[k + 1] if k + 1 < len(all_blocks) else None
    return nxt if nxt is not None and nxt.kind == "output" else None


def matches(shown: Any, got: Any) -> bool:
    """Whether real JSON output `got` is what the README shows: the same keys and values, where a shown
    string "…" stands for any text."""
    if shown == "…":
        return isinstance(got, str)
    if isinstance(shown, dict):
        return isinstance(got, dict) and shown.keys() == got.keys() and all(matches(shown[k], got[k]) for k in shown)
    return shown == got


def shown_json(block: Block) -> Any:
    return json.loads(block.code)
