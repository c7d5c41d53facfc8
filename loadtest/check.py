"""Judge a headless Locust run (loadtest/locustfile.py): fail on any unexpected error, on a path that never
completed, or on a key admitted above its rate limit; print admitted generation requests per key per minute.

    python loadtest/check.py --stats loadtest/results/loadtest --admissions loadtest/results/admissions.json \\
        --keys-file configs/keys.local.yaml
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

# Each path must have finished end to end at least once, or the run proves nothing about it.
MUST_COMPLETE = ("fal run", "fal stream: complete", "fal queue: complete", "eachlabs: complete", "openai chat",
                 "openai stream: complete")
# Admission times are the client's send times: a window this much shorter than the limiter's 60 s
# absorbs how much longer one request may take than another to reach the limiter under load (body upload,
# proxy queueing); a limiter that over-admits (say, per replica) still shows up far above the limit.
JITTER_S = 5.0


def rate_limits(keys_file: Path, default: int) -> dict[str, tuple[str, int]]:
    """key -> (its name, its rate limit)."""
    entries = yaml.safe_load(keys_file.read_text()) or []
    return {e["key"]: (e["name"], e.get("rate_per_minute") or default) for e in entries}


def sliding_max(times: list[float], window: float) -> int:
    times, best, lo = sorted(times), 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def judge(stats_prefix: Path, admissions: Path, keys_file: Path, default_rate: int = 60) -> list[str]:
    """Problems found (empty when the run passes); prints the per-key report on the way."""
    problems = []
    with open(f"{stats_prefix}_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    failures = int(rows["Aggregated"]["Failure Count"])
    if failures:
        with open(f"{stats_prefix}_failures.csv") as f:
            for r in csv.DictReader(f):
                problems.append(f"{r['Occurrences']} x {r['Method']} {r['Name']}: {r['Error']}")
    exceptions = Path(f"{stats_prefix}_exceptions.csv")
    if exceptions.exists():  # errors raised inside a user's task, outside any request
        with open(exceptions) as f:
            for r in csv.DictReader(f):
                problems.append(f"{r['Count']} x exception in a task: {r['Message']}")
    for name in MUST_COMPLETE:
        ok = int(rows.get(name, {}).get("Request Count", 0)) - int(rows.get(name, {}).get("Failure Count", 0))
        if ok <= 0:
            problems.append(f"{name}: never completed")
    limited = {n[: -len(" [429]")]: int(r["Request Count"]) for n, r in rows.items() if n.endswith(" [429]")}
    print("429s (expected where a key's load exceeds its limits):", limited or "none")

    admitted = json.loads(admissions.read_text())
    limits = rate_limits(keys_file, default_rate)
    start = min((min(t) for t in admitted.values() if t), default=0.0)
    print("admitted generation requests per key per minute (limit):")
    for key, times in sorted(admitted.items()):
        per_minute = [0] * (int((max(times) - start) // 60) + 1)
        for t in times:
            per_minute[int((t - start) // 60)] += 1
        name, limit = limits.get(key, ("(not in the keys file)", default_rate))
        peak = sliding_max(times, 60 - JITTER_S)
        print(f"  {name}: {per_minute} ({limit}/min); most in any {60 - JITTER_S:g} s: {peak}")
        if peak > limit:
            problems.append(f"key {name} admitted {peak} requests within {60 - JITTER_S:g} s, over its {limit}/min")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stats", type=Path, required=True, help="Locust's --csv prefix")
    p.add_argument("--admissions", type=Path, required=True, help="the locustfile's --admissions-file")
    p.add_argument("--keys-file", type=Path, required=True, help="the served keys file (rate limits)")
    p.add_argument("--default-rate", type=int, default=60, help="limits.rate_per_minute of the served config")
    args = p.parse_args()
    return report(judge(args.stats, args.admissions, args.keys_file, args.default_rate))


def report(problems: list[str], where: str = "") -> int:
    """Print the verdict; the exit status for it."""
    for line in problems:
        print("FAIL:", line, file=sys.stderr)
    print(f"load test: {'FAILED' if problems else 'passed'}{where}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
