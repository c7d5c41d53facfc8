"""The repository stands alone: no file in it cites or reads a document from outside it (cite docs/)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Spelled in pieces so this file does not match itself.
OUTSIDE = ("../" + "shared", "api" + "-spec", "SETUP" + "-NOTES", "DESIGN" + ".md")


def test_no_file_refers_to_documents_outside_the_repository():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    assert "README.md" in listed and "serve/app.py" in listed
    found = []
    for name in listed:
        path = ROOT / name
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        found += [f"{name}: {word}" for word in OUTSIDE if word in text]
    assert not found, found
