"""The service's Prometheus metrics, recorded through Ray's metrics API.

Every process of the deployment (ingress replicas, engine replicas and vLLM inside them) reports to
its node's Ray metrics agent, which serves them all in Prometheus text format on the node's
metrics export port (KubeRay scrapes it on every pod; `/metrics` on the HTTP port serves the local
node's). Ray prefixes every name with `ray_`: `llava_requests_total` is scraped as
`ray_llava_requests_total`, vLLM's `vllm:num_requests_running` as `ray_vllm_num_requests_running`.
Without a running Ray (unit tests, tools) recording is a no-op.

Labels are bounded: `api` (fal, eachlabs, openai), `route` (the operation, e.g. run, submit, status),
`status` (HTTP code), `key` (the API key's *name* from the keys file, never the key), `reason`,
`mode`, `source`, `state`.
"""

from __future__ import annotations

import asyncio
import threading
from functools import cache

import httpx
from ray.util.metrics import Counter, Gauge, Histogram

# Seconds: from a fraction of a second (cached image, short answers) to a long 13B generation.
LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320]
TOKEN_BUCKETS = [1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096]
BYTES_BUCKETS = [1e3, 1e4, 1e5, 1e6, 4e6, 1.6e7, 6.4e7]


class Metrics:
    def __init__(self):
        self.requests = Counter(
            "llava_requests_total", description="HTTP requests answered, by API, operation and status code.",
            tag_keys=("api", "route", "status"))
        self.request_seconds = Histogram(
            "llava_request_duration_seconds", description="Time from a request's arrival to its last byte.",
            boundaries=LATENCY_BUCKETS, tag_keys=("api", "route"))
        self.ttft_seconds = Histogram(
            "llava_time_to_first_token_seconds",
            description="Time to the first generated token: from arrival (sync, stream) or job start (job); "
            "image fetch included.", boundaries=LATENCY_BUCKETS, tag_keys=("api", "mode"))
        self.queue_wait_seconds = Histogram(
            "llava_queue_wait_seconds", description="Time a job waited in the queue before its first start.",
            boundaries=LATENCY_BUCKETS, tag_keys=("api",))
        self.input_tokens = Counter(
            "llava_input_tokens_total", description="Prompt tokens of finished generations (image tokens included).",
            tag_keys=("api", "key"))
        self.output_tokens = Counter(
            "llava_output_tokens_total", description="Generated tokens of finished generations.",
            tag_keys=("api", "key"))
        self.generations = Counter(
            "llava_generations_total", description="Generations finished, by API and key.", tag_keys=("api", "key"))
        self.refused = Counter(
            "llava_rate_limited_total", description="Requests refused by a per-key limit (429), by reason "
            "(rate, concurrency).", tag_keys=("api", "key", "reason"))
        self.in_flight = Gauge(
            "llava_in_flight_requests", description="HTTP requests this ingress replica is answering now.",
            tag_keys=("api",))
        self.jobs = Gauge(
            "llava_jobs", description="Jobs in the shared store by state (queued, running), as a job runner "
            "last saw them; every replica reports the same value, so aggregate with max.", tag_keys=("state",))
        self.image_seconds = Histogram(
            "llava_image_fetch_seconds", description="Time to turn an image reference into a decoded image "
            "(download or data: URI, decode, downscale).", boundaries=LATENCY_BUCKETS, tag_keys=("source",))
        self.image_bytes = Histogram(
            "llava_image_bytes", description="Encoded size of the images received.", boundaries=BYTES_BUCKETS,
            tag_keys=("source",))
        self._in_flight = {}
        self._lock = threading.Lock()

    def request_started(self, api: str) -> None:
        self._move_in_flight(api, +1)

    def request_finished(self, api: str, route: str, status: int, seconds: float, in_flight: bool = True) -> None:
        if in_flight:
            self._move_in_flight(api, -1)
        self.requests.inc(tags={"api": api, "route": route, "status": str(status)})
        self.request_seconds.observe(seconds, tags={"api": api, "route": route})

    def _move_in_flight(self, api: str, by: int) -> None:
        with self._lock:  # Ray gauges only `set`: keep the count here
            self._in_flight[api] = self._in_flight.get(api, 0) + by
            self.in_flight.set(self._in_flight[api], tags={"api": api})

    def first_token(self, api: str, mode: str, seconds: float) -> None:
        self.ttft_seconds.observe(seconds, tags={"api": api, "mode": mode})

    def generated(self, api: str, key: str, input_tokens: int, output_tokens: int) -> None:
        tags = {"api": api, "key": key}
        self.generations.inc(tags=tags)
        # Ray's counters refuse an increment of 0 (ValueError), and an answer may have no tokens.
        for counter, count in ((self.input_tokens, input_tokens), (self.output_tokens, output_tokens)):
            if count:
                counter.inc(count, tags=tags)

    def rate_limited(self, api: str, key: str, reason: str) -> None:
        self.refused.inc(tags={"api": api, "key": key, "reason": reason})

    def queue_wait(self, api: str, seconds: float) -> None:
        self.queue_wait_seconds.observe(max(0.0, seconds), tags={"api": api})

    def job_counts(self, queued: int, running: int) -> None:
        self.jobs.set(queued, tags={"state": "queued"})
        self.jobs.set(running, tags={"state": "running"})

    def image(self, source: str, seconds: float, size: int) -> None:
        self.image_seconds.observe(seconds, tags={"source": source})
        self.image_bytes.observe(size, tags={"source": source})


@cache
def metrics() -> Metrics:
    """The process's metrics, created on first use (in the process that records them)."""
    return Metrics()


@cache
def _node_metrics_url() -> str:
    """This node's metrics agent (a process never moves: asked of Ray's GCS once)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == here)
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


async def node_metrics() -> str:
    """Everything this node's Ray metrics agent exports (this process's metrics, the engine's and
    vLLM's when they share the node), in Prometheus text format."""
    url = await asyncio.to_thread(_node_metrics_url)
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        resp = await client.get(url)
        resp.raise_for_status()
        return resp.text
