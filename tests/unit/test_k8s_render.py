"""`make k8s` renders k8s/rayservice.yaml from a light venv (.venv-k8s: pydantic, PyYAML and Pillow at
constraints.txt's pins, no vLLM stack): rendering, and the CLI module that runs it, import nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The distributions `make k8s` installs (import names), with what they depend on.
LIGHT = {"pydantic", "pydantic_core", "annotated_types", "typing_extensions", "typing_inspection", "yaml", "PIL"}

PROBE = """
import json, sys, sysconfig
from pathlib import Path
import serve.cli  # what `make k8s` runs (python -m serve.cli render-k8s)
from serve.k8s import render
text = render(Path("configs/llava-1.5-13b-l40s.yaml"))
site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
third = {name.split(".")[0] for name, mod in list(sys.modules.items())
         if any((getattr(mod, "__file__", None) or "").startswith(s) for s in site)}
print(json.dumps({"heavy": sorted(m for m in ("ray", "vllm", "torch", "transformers") if m in sys.modules),
                  "third": sorted(third), "rendered": "serve.app:app_builder" in text}))
"""


def test_rendering_imports_neither_ray_nor_vllm():
    # A fresh interpreter: this one may have imported Ray for other tests.
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen["rendered"]
    assert seen["heavy"] == [], f"render-k8s imports {seen['heavy']}: .venv-k8s would not have them"
    # Installation artefacts (the editable finder, setuptools' distutils hack) start with "_".
    extra = {m for m in seen["third"] if not m.startswith("_")} - LIGHT
    assert not extra, f"render-k8s imports {sorted(extra)}, which `make k8s` does not install (Makefile)"
