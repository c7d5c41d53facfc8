"""Pydantic models of the whole deployment, loaded from `configs/*.yaml`.

Every model forbids unknown keys so a misspelt setting fails `llava-serve check` instead of being
silently ignored. Relative paths in a config file are resolved against the file's own directory,
so a config means the same thing whatever directory it is run from (Ray workers have their own).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import PIL.Image
import yaml
from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, ValidationError, field_validator, model_validator

ENV_KEYS_FILE = "LLAVA_SERVE_KEYS_FILE"
ENV_PORT = "PORT"
ENV_HOST = "LLAVA_SERVE_HOST"
# Redis' password, read where the store's client is made (serve/jobs/factory.py), never from a config file:
# the config is written into the RayService in clear (docs/kubernetes.md).
ENV_REDIS_PASSWORD = "LLAVA_SERVE_REDIS_PASSWORD"
# Room in a request body for everything but its image's data: URI (prompt, parameters, JSON).
BODY_OVERHEAD_BYTES = 64 * 1024
# Per-key store bounds' defaults (LimitsConfig, and serve.jobs.models.Limits for stores used without a config).
MAX_PENDING = 100  # jobs queued, not yet started
MAX_STORED_BYTES = 64 * 1024 * 1024  # bytes of the full inputs of unfinished jobs
# The most bytes a pixel of the full-size image costs while it is decoded (serve/media/decode.py derives it;
# docs/media.md, "Decode memory"): what media.decode_memory_bytes must admit for max_image_pixels.
MOST_DECODE_BYTES_PER_PIXEL = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    source: str = Field(
        description="Hugging Face repo id (e.g. llava-hf/llava-1.5-13b-hf) or a local directory; "
        "a value starting with '.' or '/' is a path, resolved against the config file's directory."
    )
    served_name: str = Field(
        "llava-1.5-13b", description="Name reported in logs and metrics, and the model id of the OpenAI route."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Weight and activation dtype passed to vLLM."
    )


class EngineConfig(_Strict):
    max_model_len: int = Field(4096, gt=0, description="Context length in tokens (prompt incl. image tokens + output).")
    max_num_seqs: int = Field(
        16, gt=0, description="Sequences vLLM batches at once; also bounds the engine replica's ongoing requests."
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Fraction of GPU memory vLLM may use (GPU only; None = vLLM's default)."
    )
    kv_cache_memory_bytes: int | None = Field(
        None, gt=0, description="Explicit KV-cache size in bytes; required on CPU, where vLLM otherwise guesses."
    )
    kv_cache_dtype: str = Field("auto", description="KV-cache dtype ('auto', 'fp8', ...).")
    enforce_eager: bool = Field(False, description="Skip torch.compile/CUDA graphs: faster start, slower steps.")
    max_num_batched_tokens: int | None = Field(
        None, gt=0, description="Token budget per scheduler step (None = vLLM's default)."
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Further vLLM AsyncEngineArgs fields, passed through verbatim."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables set in the engine replica's process."
    )
    stream_interval_s: float = Field(
        0.02, ge=0, description="Least time between two streamed text deltas leaving the engine replica; "
        "deltas arriving sooner are merged (the first token always leaves at once). A fast engine then pays "
        "one Ray object and one SSE event per interval instead of per token; 0 sends every delta as it comes.",
    )


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(1, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(
        gt=0, description="Ongoing requests per replica that autoscaling aims for."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="Sustained demand needed before adding replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Sustained idleness needed before removing replicas.")
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="With min_replicas 0: sustained idleness needed before the last replica goes "
        "(None = downscale_delay_s)."
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window over which Serve averages the ongoing requests a decision is made on."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class DeploymentConfig(_Strict):
    num_replicas: int = Field(1, ge=1, description="Fixed replica count, used when autoscaling is not set.")
    autoscaling: AutoscalingConfig | None = Field(None, description="Serve autoscaling; overrides num_replicas.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica.")
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="How long a stopping replica lets in-flight requests finish."
    )
    health_check_period_s: float = Field(10.0, gt=0, description="Interval of Serve's replica health checks.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources reserved per replica, e.g. {llava_ingress: 1} to keep replicas on the "
        "worker group whose Ray nodes advertise that resource (k8s/: the CPU group, never the GPU workers).",
    )

    def serve_options(self) -> dict[str, Any]:
        """The `serve.deployment(...).options(...)` arguments these settings stand for."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            actor["resources"] = dict(self.resources)
        opts: dict[str, Any] = {
            "ray_actor_options": actor,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": self.health_check_period_s,
        }
        if self.autoscaling is None:
            opts["num_replicas"] = self.num_replicas
        else:
            opts["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        return opts


class EngineDeploymentConfig(DeploymentConfig):
    caller_check_s: float = Field(
        1.0, gt=0, description="How often an engine replica checks that the ingress replicas it generates for are "
        "alive: Ray does not cancel a call whose caller died, so the generations of a dead ingress replica are "
        "aborted this long after its death at most, not run to their end for nobody (docs/faults.md)."
    )
    max_waiting_requests: int = Field(
        64, ge=0, description="Requests one engine replica takes beyond a full batch (engine.max_num_seqs). They "
        "wait in vLLM's own scheduler, which prepares their images while the batch decodes and starts each the "
        "moment a sequence ends; requests beyond max_num_seqs + this wait in Serve's router instead, bounded per "
        "ingress replica by ingress.max_ongoing_requests plus jobs.runner_max_parallel (docs/architecture.md, "
        "\"Where requests wait\").",
    )
    queue_poll_s: float = Field(
        2.0, gt=0, description="With autoscaling: how often the engine's autoscaling policy (in Serve's controller) "
        "reads how many jobs wait in the job store; they count as demand beside the requests Serve sees "
        "(docs/autoscaling.md)."
    )
    cold_start_wait_s: float = Field(
        30.0, gt=0, description="With autoscaling.min_replicas 0: how long a sync or streamed request waits for a "
        "resting engine to start before it is answered 503 with Retry-After (queued jobs wait in the store "
        "instead, as long as their start timeout allows: docs/autoscaling.md)."
    )

    def rests(self) -> bool:
        """Whether the engine may rest at 0 replicas (autoscaling.min_replicas 0)."""
        return self.autoscaling is not None and self.autoscaling.min_replicas == 0


class IngressConfig(DeploymentConfig):
    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per ingress replica.")
    max_ongoing_requests: int = Field(
        256, gt=0, description="HTTP requests one ingress replica holds at once (they mostly await the engine)."
    )
    readiness_timeout_s: float = Field(5.0, gt=0, description="How long /readyz waits for the engine's health check.")
    readiness_cache_s: float = Field(
        1.0, ge=0, description="How long one /readyz answer is reused: probes arriving meanwhile (and while a check "
        "is under way) share it, so a flood of probes costs one engine health check per interval (0 = every probe)."
    )

    @model_validator(mode="after")
    def _never_rests(self) -> IngressConfig:
        if self.autoscaling is not None and self.autoscaling.min_replicas == 0:
            # The job runners live in the ingress replicas: at 0 no queued job would ever start.
            raise ValueError("ingress.autoscaling.min_replicas must be at least 1 (the job runners live there)")
        return self


class HttpConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the Serve HTTP proxy binds (env LLAVA_SERVE_HOST overrides).")
    port: int = Field(8000, ge=0, le=65535, description="Port of the Serve HTTP proxy (env PORT overrides).")
    public_base_url: str | None = Field(
        None, description="Base URL clients reach this server at, for URLs put in responses (e.g. "
        "https://llava.example.com): an absolute http(s) URL, https wherever clients are outside the cluster, "
        "without credentials, query or fragment. None = the base URL of each request as it arrived. Required "
        "with proxy 'haproxy': TLS ends before HAProxy (at the cluster's ingress), so requests arrive as plain "
        "http:// and URLs derived from them would send clients (and their keys) to http://."
    )
    tls_certfile: Path | None = Field(
        None, description="PEM certificate chain: with tls_keyfile, the Serve proxy speaks HTTPS (what fal's Python "
        "client needs when pointed here by FAL_RUN_HOST alone). Usually TLS ends at the cluster's ingress instead."
    )
    tls_keyfile: Path | None = Field(None, description="PEM private key of tls_certfile.")
    max_body_bytes: int = Field(
        28 * 1024 * 1024, gt=0, description="Largest request body a route reads; a larger one is answered 413 in "
        "its API's error shape, from its Content-Length before any of it is read, or as soon as a body without "
        "one passes the cap. Must admit the largest image a client may send as a data: URI (media.max_image_bytes, "
        "base64-encoded, plus the rest of the request): the default does for the default 20 MiB image."
    )
    reference: bool = Field(
        True, description="Serve the API reference without a key: GET /docs (Swagger UI, its assets bundled in the "
        "package, no CDN) and GET /openapi.json (docs/api.md §9). False: both answer 404."
    )
    proxy: Literal["serve", "haproxy"] = Field(
        "serve",
        description="What answers on host:port. 'serve': Ray Serve's Python HTTP proxy; binds only `host`, TLS "
        "possible. 'haproxy': Ray's HAProxy ingress in Serve's throughput-optimized mode (serve.deployment.ray_env): "
        "HAProxy forwards to each ingress replica's own HTTP server and the deployments stream to each other "
        "over gRPC (docs/architecture.md, 'Engine'), for about 3x the requests per second and no throughput lost "
        "against bare vLLM (loadtest/README.md). No TLS, and the replicas' ports (30000-31000) and HAProxy's stats and "
        "metrics ports (8404, 9101) listen on every interface: for clusters whose network policy keeps them inside.",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpConfig:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together")
        if self.tls_certfile is not None and self.proxy == "haproxy":
            raise ValueError("TLS needs proxy: serve (Ray's HAProxy ingress speaks plain HTTP); "
                             "end TLS at the cluster's ingress instead")
        return self

    @field_validator("public_base_url")
    @classmethod
    def _absolute_http_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from urllib.parse import urlsplit

        try:
            url = urlsplit(v)
            _ = url.port  # raises ValueError for a port that is not a number in range
        except ValueError:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("public_base_url must be an absolute http(s) URL, e.g. https://llava.example.com")
        if url.username is not None or url.password is not None or url.query or url.fragment:
            raise ValueError("public_base_url must not hold credentials, a query or a fragment: clients are "
                             "sent URLs that start with it")
        return v

    @model_validator(mode="after")
    def _haproxy_needs_public_base_url(self) -> HttpConfig:
        # docs/kubernetes.md: with HAProxy, TLS ends at the cluster's ingress and requests arrive as http://.
        if self.proxy == "haproxy" and self.public_base_url is None:
            raise ValueError("public_base_url is required with proxy: haproxy (TLS ends at the cluster's ingress, "
                             "so requests arrive as http:// and the URLs in answers would be http://): set it to "
                             "where clients reach this server, e.g. https://llava.example.com")
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls_certfile else "http"


class AuthConfig(_Strict):
    keys_file: Path = Field(
        description="YAML list of API keys {key, name, rate_per_minute?, max_concurrent?} "
        "(env LLAVA_SERVE_KEYS_FILE overrides)."
    )
    reload_interval_s: float = Field(
        10.0, gt=0, description="How often each ingress replica rereads the keys file: a key added or removed takes "
        "effect within this (plus, on Kubernetes, the kubelet's delay in updating a mounted Secret). A file that "
        "does not validate is not loaded: the keys before it stay, and the replica logs why (never the line)."
    )


class LimitsConfig(_Strict):
    rate_per_minute: int = Field(60, gt=0, description="Default generation requests per key per rolling 60 s.")
    max_concurrent: int = Field(10, gt=0, description="Default in-flight generation requests per key.")
    max_pending: int = Field(
        MAX_PENDING, gt=0, description="Jobs one key may have queued and not yet started (fal queue and Eachlabs "
        "together); past it a submit is answered 429 in its API's shape. 100 is 10 minutes of the default rate, "
        "and more than a key at its concurrency cap can start in a while (docs/bounds.md, \"The job store\")."
    )
    max_stored_bytes: int = Field(
        MAX_STORED_BYTES, gt=0, description="Bytes of input (as JSON) one key's unfinished jobs (queued or running) "
        "may hold in the job store; a submit that would pass it is answered 429. It bounds the store's memory per "
        "key (docs/bounds.md sizes Redis from it); keep it at least http.max_body_bytes, or the largest body is "
        "never accepted."
    )


class MediaConfig(_Strict):
    fetch_timeout_s: float = Field(
        10.0, gt=0, description="Total deadline for downloading one image URL: DNS, every redirect and the body."
    )
    connect_timeout_s: float = Field(3.0, gt=0, description="Deadline for opening one connection (TCP and TLS).")
    read_timeout_s: float = Field(5.0, gt=0, description="Longest wait for the next bytes of an image response.")
    max_redirects: int = Field(
        3, ge=0, description="Redirects followed per image URL; every hop passes the SSRF guard again."
    )
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest image accepted, encoded.")
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Largest image accepted, decoded (refused before decoding: bomb guard)."
    )
    allow_networks: tuple[IPvAnyNetwork, ...] = Field(
        (),
        description="CIDRs of non-public addresses (loopback, private, link-local, ...) that image URLs may "
        "reach anyway, e.g. [10.1.2.0/24] for an internal image store. Public addresses are always allowed.",
    )
    allow_hosts: tuple[str, ...] = Field(
        (),
        description="Hostnames (exact match, ASCII/punycode form) that image URLs may reach whatever address "
        "they resolve to.",
    )
    formats: tuple[str, ...] = Field(
        ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"),
        description="Image formats accepted (Pillow names), recognised from the bytes, never from Content-Type.",
    )
    # Equivalence: a multiple of the processor's shortest_edge (CLIP: 336), at least 2x it, keeps the
    # processor's resized size identical to the unreduced path's and its pixel_values within
    # mean |diff| <= 0.01 and max |diff| <= 0.2 in normalised units (one 8-bit grey level is ~0.015);
    # tests/unit/test_media_decode.py checks that on 12 MP JPEGs and 8-12 MP PNGs, one per reduction path.
    downscale_short_edge: int | None = Field(
        672,
        gt=0,
        description="Images whose shortest edge is longer are reduced before they reach the engine: by an integer "
        "factor (JPEG: decoded at 1/2, 1/4 or 1/8 scale) to a shortest edge in [this, 2x this) when the sizes "
        "divide exactly, else resampled (bicubic) to exactly this shortest edge; the model's processor still does "
        "the final resize. Keep it a multiple of the processor's shortest_edge, at least 2x it. null disables.",
    )
    cache_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Decoded images kept in an LRU cache keyed by the hash of their encoded bytes, bounded by "
        "their RGB size in bytes; 0 disables.",
    )
    max_aspect_ratio: float = Field(
        20.0,
        ge=1,
        description="Longest side over shortest side accepted, read from the header before decoding. The model's "
        "processor scales the shortest side to 336 px, so the ratio bounds its work; 20 admits photos, panoramas "
        "and long screenshots.",
    )
    decode_memory_bytes: int = Field(
        1024 * 1024 * 1024,
        gt=0,
        description="Memory the image decodes of one ingress replica may hold at once. Each decode reserves its "
        "worst case (8 bytes a pixel; up to 20 for WebP, 16 for progressive JPEG) before it starts and waits for "
        "room; must admit max_image_pixels at 20 bytes a pixel.",
    )

    @field_validator("allow_hosts")
    @classmethod
    def _normalise_hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.strip().lower().rstrip(".") for h in v)

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        PIL.Image.init()
        names = tuple(f.upper() for f in v)
        unknown = [f for f in names if f not in PIL.Image.OPEN]
        if unknown:
            raise ValueError(f"unknown image formats {unknown}; Pillow reads {sorted(PIL.Image.OPEN)}")
        return names

    @model_validator(mode="after")
    def _budget_admits_the_largest_image(self) -> MediaConfig:
        largest = self.max_image_pixels * MOST_DECODE_BYTES_PER_PIXEL
        if largest > self.decode_memory_bytes:
            raise ValueError(
                f"decode_memory_bytes ({self.decode_memory_bytes}) must be at least {largest}: decoding an image "
                f"of max_image_pixels ({self.max_image_pixels}) holds up to that much (docs/media.md)"
            )
        return self


class JobsConfig(_Strict):
    lease_s: float = Field(
        12.0, gt=0, description="How long a running job or sync request holds its concurrency slot without a "
        "heartbeat (sent every third of it): the slots and jobs of a replica that died are free again within "
        "this plus reap_interval_s. Leases stand still while the store is unreachable (outage_after_s), so "
        "work goes on through an outage and its outcome is recorded once the store answers (docs/faults.md)."
    )
    outage_after_s: float = Field(
        3.0, gt=0, description="How long an ingress replica's store calls may go unanswered (its runner calls "
        "every reap_interval_s) before it counts as an outage: its first call once the store answers again says "
        "so, and every lease moves on by that time, since nobody could renew one meanwhile. More than "
        "reap_interval_s; less than two thirds of lease_s, so that a shorter outage, not counted, costs no lease."
    )
    max_attempts: int = Field(2, ge=1, description="Runs of a job whose runner died: 2 = re-queued once, then failed.")
    runner_retry_s: float = Field(
        0.25, gt=0, description="How long a job runner waits after a store error before it tries again. An idle "
        "runner does not poll: it waits for the store to announce claimable work (or the next reap)."
    )
    runner_poll_interval_s: float | None = Field(
        None, gt=0, description="Deprecated and ignored: runners no longer poll. Accepted so that configs written "
        "for earlier versions still load; see runner_retry_s."
    )
    runner_max_parallel: int = Field(
        64, gt=0, description="Jobs one ingress replica runs at once (claimed from the store, waiting in the engine "
        "replica beyond its batch: engine_deployment.max_waiting_requests)."
    )
    reap_interval_s: float = Field(
        1.0, gt=0, description="How often a runner recovers expired leases and results, and hands jobs the store "
        "ended itself (cancelled in the queue, timed out, worker lost) to their webhooks."
    )
    notify_lease_s: float = Field(
        600.0, gt=0, description="How long a replica holds a job's webhook delivery (all its attempts) before the "
        "store offers it to another replica: a replica that dies mid-delivery leaves it to be sent again (at least "
        "once). At least webhooks' delivery window (attempts, their deadlines and the waits between them)."
    )

    @model_validator(mode="after")
    def _outage_between_reaps_and_leases(self) -> JobsConfig:
        # docs/faults.md, "The numbers": a pause between reaps is no outage, and an outage not counted must
        # end before a lease renewed every lease_s / 3 runs out.
        if not self.reap_interval_s < self.outage_after_s < self.lease_s * 2 / 3:
            raise ValueError(f"outage_after_s ({self.outage_after_s}) must be more than reap_interval_s "
                             f"({self.reap_interval_s}) and less than two thirds of lease_s ({self.lease_s})")
        return self


class StoreConfig(_Strict):
    backend: Literal["ray_actor", "redis"] = Field(
        "ray_actor", description="Where jobs and limit counters live: a named Ray actor or Redis."
    )
    redis_url: str | None = Field(
        None, description="Redis URL, required when backend is redis. Redis' password (AUTH) comes from the "
        "environment of the ingress replicas and of Serve's controller (the engine's autoscaling policy reads the "
        "queue), LLAVA_SERVE_REDIS_PASSWORD, so it need not be written here (a "
        "password in the URL wins)."
    )
    result_ttl_s: float = Field(3600.0, gt=0, description="How long finished job results stay readable.")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> StoreConfig:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("redis_url is required when backend is 'redis'")
        return self


class ReadsConfig(_Strict):
    per_second: float = Field(
        100.0, gt=0, description="Reads one key may make per second in each ingress replica: fal status polls, "
        "results, cancels and status streams opened, Eachlabs GETs and cancels, OpenAI model lists. Past it (and "
        "its burst) a read is answered 429 in its API's shape with Retry-After. Generous: a queue client polls "
        "every 0.1 s per job, so 10 jobs in flight poll 100 times a second (docs/bounds.md, \"Reads\")."
    )
    burst: int = Field(300, gt=0, description="Reads a key may save up and spend at once.")
    max_status_streams: int = Field(
        20, gt=0, description="fal status streams (/status/stream) one key may hold open in each ingress replica; "
        "another is answered 429. Each polls the store every fal.status_stream_poll_s."
    )


class EachlabsConfig(_Strict):
    price_per_second: float = Field(
        0.0011, ge=0, description="USD per second of prediction time, reported as metrics.cost (llava-13b's price)."
    )
    run_poll_s: float = Field(
        0.25, gt=0, description="How often the blocking POST /v1/prediction/run looks at its prediction in the "
        "store while it waits (a brief read: the status only)."
    )


class FalConfig(_Strict):
    queue_base_url: str | None = Field(
        None, description="Where clients reach the fal queue API, for the status/response/cancel URLs a submit "
        "returns (fal's Python client follows them), e.g. https://llava.example.com/queue/. None = http.public_base_url "
        "+ /queue/ where that is set, else derived from each request: <scheme>://<Host>/queue/, or "
        "<scheme>://<Host>/ when the Host starts with 'queue.'."
    )
    status_stream_poll_s: float = Field(
        0.1, gt=0, description="How often a status stream (/status/stream) looks for news of its job."
    )


class TelemetryConfig(_Strict):
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Level of the service's own logs (one access line per request at INFO)."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="How the service's own lines are written: 'json', one JSON object per line for a log "
        "collector (production); 'text', one short line a person reads (`12:03:04 200 POST /fal-ai/llavav15-13b "
        "fal run key=local-dev 412 ms`), and `llava-serve run` then keeps Ray's and vLLM's INFO lines and their "
        "warnings about the machine off its console (serve/telemetry/console.py). The development console."
    )
    log_polls: bool = Field(
        False, description="Write an access line for every successful status poll (fal status, Eachlabs get) too. "
        "Off by default: a queue client polls every 0.1 s, so polls would drown the other lines (and cost each "
        "poll a log write); they are counted in llava_requests_total either way, and failed polls are logged."
    )
    metrics_route: bool = Field(
        False, description="Also answer GET /metrics on the API port (the local node's Prometheus text). Its series "
        "name every key, so production leaves it off and Prometheus scrapes each Ray pod's metrics port (8080), "
        "which the NetworkPolicy opens to the monitoring namespace only (docs/operations.md)."
    )
    metrics_report_interval_s: float = Field(
        10.0, gt=0, description="How often each process reports its metrics to the node's Ray metrics agent "
        "(local Ray started by `llava-serve run`; on KubeRay set by the cluster's own system config)."
    )


class WebhooksConfig(_Strict):
    attempts: int = Field(6, ge=1, description="Deliveries tried per webhook (any 2xx acknowledges).")
    backoff_s: float = Field(
        5.0, ge=0, description="Wait before the second attempt; each later wait doubles (5, 10, 20, ... s)."
    )
    max_backoff_s: float = Field(300.0, ge=0, description="Longest wait between two attempts.")
    timeout_s: float = Field(
        15.0, gt=0, description="Deadline of one delivery attempt, all of it: DNS, connecting, the answer's headers "
        "and the part of its body that is read."
    )
    max_response_bytes: int = Field(
        4096, ge=0, description="Most bytes of a receiver's answer read per attempt; only its status counts, the "
        "rest is never read."
    )
    max_concurrent: int = Field(
        128, gt=0, description="Delivery attempts in flight per ingress replica; further ones wait their turn (in "
        "order), deliveries waiting to retry hold no place."
    )

    def delivery_window_s(self) -> float:
        """The longest one delivery takes, all attempts and the waits between them (a turn waited for aside)."""
        waits = [min(self.backoff_s * 2 ** n, self.max_backoff_s) for n in range(self.attempts - 1)]
        return self.attempts * self.timeout_s + sum(waits)


class ServeConfig(_Strict):
    app_name: str = Field("llava", description="Ray Serve application name.")
    model: ModelConfig = Field(description="The model and its prompt template.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine arguments.")
    engine_deployment: EngineDeploymentConfig = Field(
        default_factory=EngineDeploymentConfig, description="Replicas and resources of the engine (LLMServer) deployment."
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="The HTTP ingress deployment.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="Where the Serve HTTP proxy listens.")
    auth: AuthConfig = Field(description="API keys.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Per-key limit defaults.")
    media: MediaConfig = Field(default_factory=MediaConfig, description="Image intake bounds.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="Job store and limiter backend.")
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="Job leases and the runners in the ingress.")
    eachlabs: EachlabsConfig = Field(default_factory=EachlabsConfig, description="Eachlabs prediction API settings.")
    reads: ReadsConfig = Field(default_factory=ReadsConfig, description="Per-key budgets for reads (polls, results).")
    fal: FalConfig = Field(default_factory=FalConfig, description="fal API settings.")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="Logs and metrics.")
    webhooks: WebhooksConfig = Field(
        default_factory=WebhooksConfig,
        description="Outbound webhooks of both APIs (fal_webhook, Eachlabs webhook_url).",
    )

    @field_validator("app_name")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("app_name must not be empty")
        return v

    @model_validator(mode="after")
    def _engine_scales_before_its_batch_is_full(self) -> ServeConfig:
        # An engine replica batches at most max_num_seqs requests; a target above that is only reached by
        # requests waiting for a place in the batch, so replicas would be added too late.
        scaling = self.engine_deployment.autoscaling
        if scaling is not None and scaling.target_ongoing_requests > self.engine.max_num_seqs:
            raise ValueError(
                f"engine_deployment.autoscaling.target_ongoing_requests ({scaling.target_ongoing_requests:g}) must "
                f"not exceed engine.max_num_seqs ({self.engine.max_num_seqs}): scale up before vLLM's batch is full"
            )
        return self

    @model_validator(mode="after")
    def _body_admits_the_largest_image(self) -> ServeConfig:
        # A data: URI carries the image base64-encoded (4 bytes per 3), inside JSON with the prompt.
        need = 4 * -(-self.media.max_image_bytes // 3) + BODY_OVERHEAD_BYTES
        if self.http.max_body_bytes < need:
            raise ValueError(
                f"http.max_body_bytes ({self.http.max_body_bytes}) must admit the largest image as a data: URI: at "
                f"least {need} bytes for media.max_image_bytes {self.media.max_image_bytes}"
            )
        return self

    @model_validator(mode="after")
    def _a_key_may_store_the_largest_body(self) -> ServeConfig:
        # Otherwise the largest job a route accepts could never be queued: refused as "stored" forever.
        if self.limits.max_stored_bytes < self.http.max_body_bytes:
            raise ValueError(
                f"limits.max_stored_bytes ({self.limits.max_stored_bytes}) must be at least http.max_body_bytes "
                f"({self.http.max_body_bytes}): a key must be able to queue the largest request it may send"
            )
        return self

    @model_validator(mode="after")
    def _a_delivery_ends_within_its_lease(self) -> ServeConfig:
        # Otherwise a slow delivery would be offered to another replica while still running: sent twice.
        if self.jobs.notify_lease_s < (window := self.webhooks.delivery_window_s()):
            raise ValueError(f"jobs.notify_lease_s ({self.jobs.notify_lease_s:g}) must be at least the webhooks' "
                             f"delivery window, {window:g} s (attempts x timeout_s + the waits between them)")
        return self

    def engine_max_ongoing_requests(self) -> int:
        # A full batch and a queue in vLLM, not Ray's default of 5: a request waiting in Serve's router is
        # retried with backoff (up to 0.5 s), so a freed sequence would sit idle until a retry came round;
        # waiting in vLLM's scheduler it starts at once (docs/architecture.md, "Where requests wait").
        return self.engine.max_num_seqs + self.engine_deployment.max_waiting_requests


class ConfigError(ValueError):
    """A config that cannot be used; `errors` lists 'field.path: message' lines."""

    def __init__(self, source: str, errors: list[str]):
        self.errors = errors
        super().__init__(f"{source}: invalid config\n" + "\n".join(f"  {e}" for e in errors))


def _field_errors(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
        out.append(f"{where}: {err['msg']}{got}")
    return out


def _is_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def parse_config(data: Any, base_dir: Path, env: Mapping[str, str], source: str = "config") -> ServeConfig:
    """Validate raw config data, resolve relative paths against `base_dir`, apply env overrides."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping of settings"])
    data = dict(data)
    if env.get(ENV_KEYS_FILE):
        # A path from the environment is relative to where the command runs, not to the file.
        data["auth"] = {**(data.get("auth") or {}), "keys_file": Path(env[ENV_KEYS_FILE]).expanduser().resolve()}
    if env.get(ENV_PORT):
        data["http"] = {**(data.get("http") or {}), "port": env[ENV_PORT]}
    if env.get(ENV_HOST):  # the CPU image binds 0.0.0.0 with the embedded default's config
        data["http"] = {**(data.get("http") or {}), "host": env[ENV_HOST]}
    try:
        cfg = ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _field_errors(exc)) from None

    model = cfg.model
    if _is_path(model.source):
        model = model.model_copy(update={"source": str((base_dir / Path(model.source).expanduser()).resolve())})
    keys_file = (base_dir / cfg.auth.keys_file.expanduser()).resolve()
    http = cfg.http
    if http.tls_certfile is not None:
        http = http.model_copy(update={
            "tls_certfile": (base_dir / http.tls_certfile.expanduser()).resolve(),
            "tls_keyfile": (base_dir / http.tls_keyfile.expanduser()).resolve(),
        })
    return cfg.model_copy(update={"model": model, "auth": cfg.auth.model_copy(update={"keys_file": keys_file}), "http": http})


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> ServeConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(str(path), [f"(file): cannot read {path.resolve()}: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"(file): not valid YAML: {exc}"]) from None
    return parse_config(data, path.parent.resolve(), os.environ if env is None else env, str(path))
