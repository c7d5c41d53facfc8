"""`make loadtest`: a short headless Locust run against a local stack (started here unless --host is
given), then loadtest/check.py's verdict. Writes CSV, an HTML report and the admissions log under --out."""

from __future__ import annotations

import argparse
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import check  # noqa: E402
import stack  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", help="a running llava-serve (default: start configs/local-cpu.yaml here)")
    p.add_argument("--keys-file", type=Path, default=stack.ROOT / "configs" / "keys.local.yaml",
                   help="the served keys file: its rate limits are what the run is judged against")
    p.add_argument("--default-rate", type=int, default=60,
                   help="limits.rate_per_minute of the served config (keys without their own)")
    p.add_argument("--fal-keys", default="local-test-key,local-burst-key")
    p.add_argument("--eachlabs-keys", default="local-each-key")
    p.add_argument("--openai-keys", default="local-test-key")
    p.add_argument("--users", type=int, default=12)
    p.add_argument("--duration", type=int, default=60, help="seconds of load")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    server = (nullcontext(args.host) if args.host else
              stack.llava_serve(stack.ROOT / "configs" / "local-cpu.yaml", stack.free_port(), args.keys_file,
                                log=open(args.out / "server.log", "w")))
    for stale in [*args.out.glob("loadtest*"), args.out / "admissions.json"]:  # never judge an earlier run
        stale.unlink(missing_ok=True)
    with server as host:
        cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", host,
               "-u", str(args.users), "-r", str(args.users), "-t", f"{args.duration}s", "--stop-timeout", "60",
               "--csv", str(args.out / "loadtest"), "--html", str(args.out / "loadtest.html"), "--only-summary",
               "--fal-keys", args.fal_keys, "--eachlabs-keys", args.eachlabs_keys,
               "--openai-keys", args.openai_keys, "--max-new-tokens", str(args.max_new_tokens),
               "--admissions-file", str(args.out / "admissions.json")]
        print("load test:", " ".join(cmd[2:]), flush=True)
        locust = subprocess.run(cmd, cwd=HERE, check=False)
    if not (args.out / "loadtest_stats.csv").exists():
        print(f"FAIL: locust exited with {locust.returncode} and wrote no results", file=sys.stderr)
        return 1
    problems = check.judge(args.out / "loadtest", args.out / "admissions.json", args.keys_file, args.default_rate)
    return check.report(problems, f" (report: {args.out / 'loadtest.html'})")


if __name__ == "__main__":
    sys.exit(main())
