"""The capacity model (`llava-serve capacity`, docs/capacity.md): what one L40S engine replica can serve, how
many GPUs and ingress CPUs a workload needs, and whether a config and its RayService agree with that.

Arithmetic only, on four kinds of input, and every figure says which it comes from: the GPU's datasheet, the
model's architecture, the config, and the ingress costs `make bench` measured (MEASURED); plus a few stated
assumptions (ASSUMED) where neither a datasheet nor a measurement gives the number. Nothing here starts or
imports Ray or vLLM, so it runs anywhere the config loads.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION_CONFIG = ROOT / "configs" / "llava-1.5-13b-l40s.yaml"
RAYSERVICE = ROOT / "k8s" / "rayservice.yaml"  # its serveConfigV2 is rendered from PRODUCTION_CONFIG

# Where a figure comes from. "computed" figures are only as good as the others they are computed from.
# The model's architecture numbers (layers, heads, ...) are published, like the datasheet's: the figures
# derived from them are "computed", and show the numbers in their formula.
SRC_DATASHEET, SRC_CONFIG, SRC_WORKLOAD, SRC_ASSUMED, SRC_MEASURED, SRC_COMPUTED = (
    "datasheet", "config", "workload", "assumed", "measured", "computed")


@dataclass(frozen=True)
class Gpu:
    """One GPU, as its datasheet gives it. Override a field (dataclasses.replace) to size another GPU."""

    name: str = "NVIDIA L40S"
    memory_bytes: float = 48e9        # 48 GB GDDR6; vLLM's gpu_memory_utilization is a fraction of the whole
    bandwidth_bytes_s: float = 864e9  # 864 GB/s: what a decode step, which reads every weight once, is bound by
    fp16_flops: float = 362e12        # FP16 tensor cores, dense (the 733 TFLOPS figure needs 2:4 sparsity)


L40S = Gpu()


@dataclass(frozen=True)
class Architecture:
    """LLaVA-1.5-13B as llava-hf/llava-1.5-13b-hf's config.json describes it: Vicuna-13B v1.5 (the
    Llama-2-13B architecture), a CLIP ViT-L/14 vision tower at 336 px and a two-layer MLP projector."""

    name: str = "LLaVA-1.5-13B"
    layers: int = 40
    hidden: int = 5120
    heads: int = 40
    kv_heads: int = 40          # Llama-2-13B has no grouped-query attention: K and V keep all 40 heads
    intermediate: int = 13824
    vocab: int = 32064          # Llama's 32,000 tokens plus <image>, padded (llava-hf)
    vision_layers: int = 24
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    image_size: int = 336
    patch_size: int = 14

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def image_tokens(self) -> int:
        # Every patch of the image becomes one token of the language model's prompt (336/14 = 24; 24² = 576).
        return (self.image_size // self.patch_size) ** 2

    def llm_params(self) -> int:
        kv_width = self.kv_heads * self.head_dim
        per_layer = (
            2 * self.hidden * self.hidden + 2 * self.hidden * kv_width  # q, o; k, v (no biases in Llama)
            + 3 * self.hidden * self.intermediate                     # gate, up, down
            + 2 * self.hidden                                         # two RMSNorms
        )
        # Input embeddings and the LM head are separate matrices in Llama-2; one final RMSNorm.
        return 2 * self.vocab * self.hidden + self.layers * per_layer + self.hidden

    def vision_params(self) -> int:
        h, i = self.vision_hidden, self.vision_intermediate
        positions = self.image_tokens + 1  # the patches and CLIP's class token
        per_layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # attention, MLP, two LayerNorms
        # Patch embedding (no bias), class token, position embeddings, pre- and post-LayerNorm. vLLM drops the
        # last layer (LLaVA reads the one before it), 25 MB less: counted anyway, the figure errs high.
        return 3 * self.patch_size ** 2 * h + h + positions * h + 2 * 2 * h + self.vision_layers * per_layer

    def projector_params(self) -> int:
        return (self.vision_hidden * self.hidden + self.hidden) + (self.hidden * self.hidden + self.hidden)

    def params(self) -> int:
        return self.llm_params() + self.vision_params() + self.projector_params()

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        # Each layer keeps one key and one value vector per KV head for every token in the context.
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes


LLAVA_15_13B = Architecture()


@dataclass(frozen=True)
class Assumptions:
    """Numbers neither a datasheet nor a measurement gives; each is a stated estimate, overridable."""

    # What vLLM keeps out of the KV cache besides the weights, inside its gpu_memory_utilization share: the CUDA
    # context and cuBLAS workspaces, CUDA graphs of the decode batch sizes, and the peak activations of a
    # max_num_batched_tokens prefill (with the vision tower's). vLLM profiles this at start-up and logs the KV
    # that is left ("Available KV cache memory"); replace this estimate with that line from an L40S.
    reserve_bytes: float = 2.5e9
    # Share of the datasheet's FLOPS a 636-token prefill reaches (the GEMMs are large but far from peak).
    prefill_mfu: float = 0.5
    # Replicas and ingress CPUs are sized for this multiple of the load: a replica runs at 1/1.25 = 80% of
    # what the model says it can do, which covers bursts and the model's optimism (a decode step at the
    # full datasheet bandwidth is a floor, not a prediction).
    headroom: float = 1.25
    # vLLM's own default, used when the config leaves engine.gpu_memory_utilization unset.
    default_gpu_memory_utilization: float = 0.9


ASSUMED = Assumptions()


class Measurement(NamedTuple):
    value: float
    unit: str
    where: str


# Ingress CPU time per unit of work, as `make bench` reads it from the ingress replica's process CPU time (not
# wall time) and prints it; loadtest/README.md records the runs. All from the 2-core CPU development box with
# the tiny model; each says its layout. The one place these numbers live: update them here from a new run
# (better, from the production layout on production CPUs, which are likely faster).
MEASURED: dict[str, Measurement] = {
    "sync_request_cpu_s": Measurement(
        0.0095, "CPU-s", "ingress CPU of one fal sync request (64 tokens, a unique 640x480-1024x768 JPEG), "
        "HAProxy + Redis, c=10: `make bench --unique-images`, 7.75-9.5 ms in two runs, 2-core CPU box"),
    "status_poll_cpu_s": Measurement(
        0.00047, "CPU-s", "ingress CPU of one fal status poll, HAProxy + Redis: `make bench`, 0.43-0.47 ms in two "
        "runs, 2-core CPU box"),
    "polls_per_request": Measurement(
        4, "polls", "status polls a queue client made per request at c=10 (every 0.1 s, ~0.4 s jobs): `make bench`, "
        "2-core CPU box"),
}

_MEASURED_LABELS = {
    "sync_request_cpu_s": "ingress CPU per fal sync request",
    "status_poll_cpu_s": "ingress CPU per status poll",
    "polls_per_request": "status polls per queue request (CPU box)",
}

# Not a measurement: fal's Python client polls a queued request's status this often (fal_client's
# DEFAULT_QUEUE_POLL_INTERVAL; loadtest/locustfile.py's queue users do the same). On an L40S a request under
# full load takes seconds, so it is polled more often than the ~1 s jobs of the CPU box were.
CLIENT_POLL_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Workload:
    """What the deployment is sized for. The defaults are an assumption, not traffic we have seen: 60 text
    tokens is the llava_v1 template (~35 tokens) plus a short question; 200 output tokens is a descriptive
    answer, between fal's default cap (64) and Eachlabs' (1024)."""

    rps: float = 4.0
    prompt_tokens: int = 60
    output_tokens: int = 200


DEFAULT_WORKLOAD = Workload()

_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}


def dtype_bytes(model_dtype: str, kv_cache_dtype: str = "auto") -> int:
    """Bytes per KV-cache element: vLLM's kv_cache_dtype, where 'auto' is the model's dtype ('auto' there is
    the checkpoint's, float16 for llava-hf/llava-1.5-13b-hf)."""
    name = kv_cache_dtype.lower()
    if name == "auto":
        name = "float16" if model_dtype == "auto" else model_dtype
    if name.startswith("fp8"):  # fp8, fp8_e4m3, fp8_e5m2, ...
        return 1
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown KV-cache dtype {kv_cache_dtype!r}")
    return _DTYPE_BYTES[name]


class Figure(NamedTuple):
    key: str
    label: str
    value: float | int | None
    unit: str
    source: str
    how: str  # the formula with the numbers, or where the figure comes from


@dataclass(frozen=True)
class Estimate:
    """The model's figures for one config and workload (docs/capacity.md explains each)."""

    gpu_memory_utilization: float
    weights_bytes: float
    decode_weights_bytes: float
    kv_bytes_per_token: int
    image_tokens: int
    request_tokens: int
    kv_budget_bytes: float
    kv_bound: int
    full_context_bound: int
    batch: int
    step_s: float | None
    decode_tokens_s: float
    prefill_flops: float
    prefill_s: float
    replica_rps: float
    replica_output_tokens_s: float
    latency_s: float | None
    gpus_needed: int | None
    polls_per_request: float
    ingress_cpu_per_request_s: float
    ingress_cpus: float
    ingress_cpus_per_replica: float
    figures: tuple[Figure, ...]

    def value(self, key: str) -> Any:
        return {f.key: f.value for f in self.figures}[key]


def estimate(cfg: ServeConfig, workload: Workload = DEFAULT_WORKLOAD, gpu: Gpu = L40S,
             arch: Architecture = LLAVA_15_13B, assumed: Assumptions = ASSUMED) -> Estimate:
    e = cfg.engine
    figs: list[Figure] = []

    def fig(key, label, value, unit, source, how=""):
        figs.append(Figure(key, label, value, unit, source, how))
        return value

    fig("gpu_memory_bytes", "GPU memory", gpu.memory_bytes, "B", SRC_DATASHEET, gpu.name)
    fig("gpu_bandwidth_bytes_s", "GPU memory bandwidth", gpu.bandwidth_bytes_s, "B/s", SRC_DATASHEET, gpu.name)
    fig("gpu_fp16_flops", "GPU FP16 tensor FLOPS (dense)", gpu.fp16_flops, "FLOP/s", SRC_DATASHEET, gpu.name)

    # --- memory -----------------------------------------------------------------------------------------------
    wbytes = dtype_bytes(cfg.model.dtype)
    llm, vision, proj = arch.llm_params(), arch.vision_params(), arch.projector_params()
    weights = fig("weights_bytes", "weights (LLM + vision tower + projector)", (llm + vision + proj) * wbytes, "B",
                  SRC_COMPUTED, f"({llm / 1e9:.3f}B LLM + {vision / 1e9:.3f}B CLIP + {proj / 1e9:.3f}B projector "
                  f"params) x {wbytes} B")
    decode_weights = fig("decode_weights_bytes", "weights read per decode step (LLM only)", llm * wbytes, "B",
                         SRC_COMPUTED, f"{llm / 1e9:.3f}B params x {wbytes} B: the vision tower runs at prefill only")
    kv_elem = dtype_bytes(cfg.model.dtype, e.kv_cache_dtype)
    kv_tok = fig("kv_bytes_per_token", "KV cache per token", arch.kv_bytes_per_token(kv_elem), "B", SRC_COMPUTED,
                 f"{arch.layers} layers x 2 (K,V) x {arch.kv_heads} heads x {arch.head_dim} x {kv_elem} B "
                 f"(kv_cache_dtype {e.kv_cache_dtype})")
    image = fig("image_tokens", "image tokens per request", arch.image_tokens, "tokens", SRC_COMPUTED,
                f"({arch.image_size}/{arch.patch_size})^2")
    fig("prompt_tokens", "text prompt tokens per request", workload.prompt_tokens, "tokens", SRC_WORKLOAD)
    fig("output_tokens", "output tokens per request", workload.output_tokens, "tokens", SRC_WORKLOAD)
    req_tokens = fig("request_tokens", "tokens per request (KV at its end)",
                     image + workload.prompt_tokens + workload.output_tokens, "tokens", SRC_COMPUTED,
                     f"{image} + {workload.prompt_tokens} + {workload.output_tokens}")
    fig("max_model_len", "context length", e.max_model_len, "tokens", SRC_CONFIG, "engine.max_model_len")
    fig("max_num_seqs", "batch cap", e.max_num_seqs, "sequences", SRC_CONFIG, "engine.max_num_seqs")
    if e.gpu_memory_utilization is None:
        util = fig("gpu_memory_utilization", "GPU memory share for vLLM", assumed.default_gpu_memory_utilization,
                   "", SRC_ASSUMED, "unset in the config: vLLM's default")
    else:
        util = fig("gpu_memory_utilization", "GPU memory share for vLLM", e.gpu_memory_utilization, "", SRC_CONFIG,
                   "engine.gpu_memory_utilization")
    reserve = fig("reserve_bytes", "activations, CUDA graphs, CUDA context", assumed.reserve_bytes, "B", SRC_ASSUMED,
                  "vLLM profiles it at start-up; replace with its 'Available KV cache memory' line")
    if e.kv_cache_memory_bytes is not None:
        budget = fig("kv_budget_bytes", "KV cache budget", float(e.kv_cache_memory_bytes), "B", SRC_CONFIG,
                     "engine.kv_cache_memory_bytes (set explicitly)")
    else:
        budget = fig("kv_budget_bytes", "KV cache budget", util * gpu.memory_bytes - weights - reserve, "B",
                     SRC_COMPUTED, f"{util:g} x {gpu.memory_bytes / 1e9:g} GB - {weights / 1e9:.2f} GB weights "
                     f"- {reserve / 1e9:g} GB reserve")
    kv_bound = fig("kv_bound", "KV-bound concurrency", max(0, math.floor(budget / (kv_tok * req_tokens))),
                   "sequences", SRC_COMPUTED, f"floor({budget / 1e9:.2f} GB / ({kv_tok:,} B x {req_tokens} tokens))")
    full_bound = fig("full_context_bound", "KV-bound concurrency at full context",
                     max(0, math.floor(budget / (kv_tok * e.max_model_len))), "sequences", SRC_COMPUTED,
                     f"floor({budget / 1e9:.2f} GB / ({kv_tok:,} B x {e.max_model_len} tokens))")
    batch = fig("batch", "batch at full load", min(e.max_num_seqs, kv_bound), "sequences", SRC_COMPUTED,
                f"min(max_num_seqs {e.max_num_seqs}, KV-bound {kv_bound})")

    # --- decode and prefill ----------------------------------------------------------------------------------
    # A sequence is halfway through its answer on average, so a step reads that much of each one's KV.
    mean_ctx = image + workload.prompt_tokens + workload.output_tokens / 2
    if batch > 0:
        step_bytes = decode_weights + batch * mean_ctx * kv_tok
        step = fig("step_s", "decode step floor", step_bytes / gpu.bandwidth_bytes_s, "s", SRC_COMPUTED,
                   f"({decode_weights / 1e9:.2f} GB weights + {batch} x {mean_ctx:g} tokens x {kv_tok:,} B KV) "
                   f"/ {gpu.bandwidth_bytes_s / 1e9:g} GB/s")
        decode_tps = fig("decode_tokens_s", "decode tokens/s per replica (no prefill)", batch / step, "tokens/s",
                         SRC_COMPUTED, f"{batch} / {step * 1e3:.1f} ms")
    else:
        step = fig("step_s", "decode step floor", None, "s", SRC_COMPUTED, "no sequence fits the KV cache")
        decode_tps = fig("decode_tokens_s", "decode tokens/s per replica (no prefill)", 0.0, "tokens/s", SRC_COMPUTED)
    prompt_len = image + workload.prompt_tokens
    flops = fig("prefill_flops", "prefill FLOPs per request",
                2 * llm * prompt_len + 2 * vision * (image + 1) + 2 * proj * image, "FLOP", SRC_COMPUTED,
                f"2 x ({llm / 1e9:.2f}B x {prompt_len} + {vision / 1e9:.2f}B x {image + 1} + "
                f"{proj / 1e9:.3f}B x {image}); attention's n^2 term (~1%) left out")
    fig("prefill_mfu", "prefill share of peak FLOPS (MFU)", assumed.prefill_mfu, "", SRC_ASSUMED)
    prefill = fig("prefill_s", "prefill time per request", flops / (assumed.prefill_mfu * gpu.fp16_flops), "s",
                  SRC_COMPUTED,
                  f"{flops / 1e12:.1f} TFLOP / ({assumed.prefill_mfu:g} x {gpu.fp16_flops / 1e12:g} TFLOPS)")
    if batch > 0:
        # GPU time each request costs its replica: its own prefill (which holds up the batch's steps) plus its
        # share of the decode steps, one token per step among `batch` sequences.
        gpu_s = prefill + workload.output_tokens * step / batch
        rps = fig("replica_rps", "requests/s per replica", 1 / gpu_s, "req/s", SRC_COMPUTED,
                  f"1 / ({prefill * 1e3:.1f} ms + {workload.output_tokens} x {step * 1e3:.1f} ms / {batch})")
        latency = fig("latency_s", "request latency at full load", batch / rps, "s", SRC_COMPUTED,
                      f"{batch} in flight / {rps:.2f} req/s (Little's law)")
    else:
        rps = fig("replica_rps", "requests/s per replica", 0.0, "req/s", SRC_COMPUTED, "no sequence fits the KV cache")
        latency = fig("latency_s", "request latency at full load", None, "s", SRC_COMPUTED)
    out_tps = fig("replica_output_tokens_s", "output tokens/s per replica", rps * workload.output_tokens,
                  "tokens/s", SRC_COMPUTED, f"{rps:.2f} req/s x {workload.output_tokens}")

    # --- the workload --------------------------------------------------------------------------------------
    fig("rps", "workload requests/s", workload.rps, "req/s", SRC_WORKLOAD)
    fig("headroom", "headroom factor", assumed.headroom, "", SRC_ASSUMED, "replicas and CPUs sized for load x this")
    gpus = fig("gpus_needed", "GPUs (engine replicas) needed", math.ceil(workload.rps * assumed.headroom / rps)
               if rps > 0 else None, "GPUs", SRC_COMPUTED,
               f"ceil({workload.rps:g} req/s x {assumed.headroom:g} / {rps:.2f} req/s)")

    # --- ingress ---------------------------------------------------------------------------------------------
    sync_cpu, poll_cpu = MEASURED["sync_request_cpu_s"].value, MEASURED["status_poll_cpu_s"].value
    for key, m in MEASURED.items():
        fig(key, _MEASURED_LABELS[key], m.value, m.unit, SRC_MEASURED, m.where)
    # A queue client polls for as long as its request runs; the CPU box's jobs ran ~1 s, an L40S's at full
    # load run `latency`: whichever gives more polls.
    polled = (latency or 0) / CLIENT_POLL_INTERVAL_S
    polls = fig("polls_at_latency", "status polls per queue request here", max(MEASURED["polls_per_request"].value,
                polled), "polls", SRC_COMPUTED, f"max(measured {MEASURED['polls_per_request'].value:g}, "
                f"{latency or 0:.1f} s / {CLIENT_POLL_INTERVAL_S:g} s client poll interval)")
    per_req = fig("ingress_cpu_per_request_s", "ingress CPU per request (fal queue, polled)",
                  sync_cpu + polls * poll_cpu, "CPU-s", SRC_COMPUTED,
                  f"{sync_cpu * 1e3:g} ms + {polls:.0f} polls x {poll_cpu * 1e3:g} ms; the costliest path, "
                  "assumed for every request")
    ing = fig("ingress_cpus", "ingress CPUs for the workload", workload.rps * per_req, "CPUs", SRC_COMPUTED,
              f"{workload.rps:g} req/s x {per_req * 1e3:.0f} ms")
    ing_rep = fig("ingress_cpus_per_replica", "ingress CPUs per engine replica at full load", rps * per_req,
                  "CPUs", SRC_COMPUTED, f"{rps:.2f} req/s x {per_req * 1e3:.0f} ms")

    return Estimate(
        gpu_memory_utilization=util, weights_bytes=weights, decode_weights_bytes=decode_weights,
        kv_bytes_per_token=kv_tok, image_tokens=image, request_tokens=req_tokens, kv_budget_bytes=budget,
        kv_bound=kv_bound, full_context_bound=full_bound, batch=batch, step_s=step, decode_tokens_s=decode_tps,
        prefill_flops=flops, prefill_s=prefill, replica_rps=rps, replica_output_tokens_s=out_tps,
        latency_s=latency, gpus_needed=gpus, polls_per_request=polls, ingress_cpu_per_request_s=per_req,
        ingress_cpus=ing, ingress_cpus_per_replica=ing_rep, figures=tuple(figs),
    )


# --- the check ---------------------------------------------------------------------------------------------


def _replica_bounds(dep) -> tuple[int, int]:
    s = dep.autoscaling
    return (dep.num_replicas, dep.num_replicas) if s is None else (s.min_replicas, s.max_replicas)


def check(cfg: ServeConfig, workload: Workload = DEFAULT_WORKLOAD, rayservice: dict | None = None,
          est: Estimate | None = None, assumed: Assumptions = ASSUMED,
          manifest: str = "k8s/rayservice.yaml") -> list[str]:
    """Where the config (and, if given, the RayService that deploys it) disagrees with the model, as
    'field: problem (numbers)' lines; empty when they agree."""
    try:
        est = est or estimate(cfg, workload, assumed=assumed)
    except ValueError as exc:
        return [f"engine.kv_cache_dtype: {exc}"]
    e, dep = cfg.engine, cfg.engine_deployment
    gb = 1e9
    problems = []
    if est.kv_budget_bytes <= 0:
        problems.append(
            f"engine.gpu_memory_utilization: {est.gpu_memory_utilization:g} x "
            f"{est.value('gpu_memory_bytes') / gb:g} GB "
            f"leaves no room for the KV cache after {est.weights_bytes / gb:.1f} GB of weights and "
            f"{assumed.reserve_bytes / gb:g} GB of reserve")
    elif est.full_context_bound < 1:
        problems.append(
            f"engine.max_model_len: one {e.max_model_len}-token sequence needs "
            f"{est.kv_bytes_per_token * e.max_model_len / gb:.2f} GB of KV cache, the budget is "
            f"{est.kv_budget_bytes / gb:.2f} GB (vLLM refuses to start)")
    if est.request_tokens > e.max_model_len:
        problems.append(f"engine.max_model_len: {e.max_model_len} tokens is shorter than the workload's "
                        f"{est.request_tokens}-token requests")
    if e.max_num_seqs > est.kv_bound:
        problems.append(
            f"engine.max_num_seqs: {e.max_num_seqs} sequences, but the KV cache holds {est.kv_bound} of "
            f"{est.request_tokens} tokens ({est.kv_budget_bytes / gb:.2f} GB / {est.kv_bytes_per_token:,} B per "
            f"token); vLLM would admit more than fit and preempt them")
    scaling = dep.autoscaling
    if scaling is not None and scaling.target_ongoing_requests > est.batch:
        problems.append(
            f"engine_deployment.autoscaling.target_ongoing_requests: {scaling.target_ongoing_requests:g} is above "
            f"the batch one replica runs ({est.batch}): replicas would be added only once requests queue")
    if dep.num_gpus != 1:
        problems.append(f"engine_deployment.num_gpus: {dep.num_gpus:g}; the model sizes one GPU per engine replica")
    _, hi = _replica_bounds(dep)
    if est.gpus_needed is not None and hi < est.gpus_needed:
        problems.append(
            f"engine_deployment: at most {hi} replicas serve {hi * est.replica_rps / assumed.headroom:.2f} req/s at "
            f"{100 / assumed.headroom:.0f}% load; the workload's {workload.rps:g} req/s needs {est.gpus_needed}")
    need = _ingress_cpus_needed(est, hi, assumed)
    i_lo, _ = _replica_bounds(cfg.ingress)
    have = i_lo * cfg.ingress.num_cpus
    if need > have:
        # Ingress autoscaling follows ongoing HTTP requests, not CPU: the replicas always there must keep up.
        problems.append(
            f"ingress: {i_lo} replicas x {cfg.ingress.num_cpus:g} CPUs = {have:g} CPUs, but {hi} engine replicas at "
            f"full load need {need:.2f} ingress CPUs ({hi} x {est.replica_rps:.2f} req/s x "
            f"{est.ingress_cpu_per_request_s * 1e3:.0f} ms x {assumed.headroom:g} headroom)")
    if rayservice is not None:
        problems += check_rayservice(cfg, rayservice, est, assumed, manifest)
    return problems


def _ingress_cpus_needed(est: Estimate, engine_replicas: int, assumed: Assumptions) -> float:
    return engine_replicas * est.replica_rps * est.ingress_cpu_per_request_s * assumed.headroom


def load_rayservice(path: str | Path) -> dict:
    """The RayService object of a manifest file (k8s/rayservice.yaml: one document; kustomize adds only the
    namespace and the image name, neither of which the model reads)."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if isinstance(d, dict)]
    found = [d for d in docs if d.get("kind") == "RayService"]
    if len(found) != 1:
        raise ValueError(f"{path}: expected one RayService, found {len(found)}")
    return found[0]


def _ray_resources(group: dict) -> dict[str, float]:
    # KubeRay passes rayStartParams.resources to `ray start --resources` as written: JSON inside a quoted
    # string, so it may take two decodes.
    raw: Any = group.get("rayStartParams", {}).get("resources")
    while isinstance(raw, str) and raw.strip():
        raw = json.loads(raw)
    return {k: float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _cpu_quantity(q: Any) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _container(group: dict) -> dict:
    containers = group["template"]["spec"]["containers"]
    return containers[0]


def check_rayservice(cfg: ServeConfig, rayservice: dict, est: Estimate, assumed: Assumptions = ASSUMED,
                     manifest: str = "k8s/rayservice.yaml") -> list[str]:
    """The worker groups against the config and the model: one engine replica (one GPU) per GPU pod, enough GPU
    pods for the engine's replica bound, and ingress pods whose CPU requests cover the ingress CPUs the
    engines need at full load."""
    problems = []
    groups = rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])
    where = manifest
    dep = cfg.engine_deployment
    _, hi = _replica_bounds(dep)

    gpu_groups = [g for g in groups if float(g.get("rayStartParams", {}).get("num-gpus", 0)) > 0]
    if len(gpu_groups) != 1:
        problems.append(f"{where}: expected one GPU worker group (rayStartParams num-gpus), found {len(gpu_groups)}")
    for g in gpu_groups:
        name = f"{where} {g['groupName']}"
        per_pod = float(g["rayStartParams"]["num-gpus"])
        limit = float(_container(g).get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        if per_pod != dep.num_gpus or limit != per_pod:
            problems.append(f"{name}: each pod must hold exactly one engine replica's GPUs ({dep.num_gpus:g}): "
                            f"rayStartParams num-gpus {per_pod:g}, container limit nvidia.com/gpu {limit:g}")
        if g.get("maxReplicas", 0) < hi:
            problems.append(f"{name}: maxReplicas {g.get('maxReplicas')} pods cannot hold the engine's "
                            f"{hi} replicas (one per GPU)")

    ing = cfg.ingress
    wanted = set(ing.resources) or {"llava_ingress"}
    ing_groups = [g for g in groups if wanted & set(_ray_resources(g))]
    if len(ing_groups) != 1:
        problems.append(f"{where}: expected one worker group advertising {sorted(wanted)} for the ingress, "
                        f"found {len(ing_groups)}")
        return problems
    (g,) = ing_groups
    name = f"{where} {g['groupName']}"
    ray_cpus = float(g["rayStartParams"].get("num-cpus", 0))
    requests = _container(g).get("resources", {}).get("requests", {})
    pod_cpus = _cpu_quantity(requests.get("cpu", 0))
    if pod_cpus < ray_cpus:
        problems.append(f"{name}: the pod requests {pod_cpus:g} CPUs but Ray schedules {ray_cpus:g} on it "
                        "(num-cpus): replicas would be promised CPUs Kubernetes does not reserve")
    res = _ray_resources(g)
    fits = [res.get(r, 0) / need for r, need in ing.resources.items() if need > 0]
    if ing.num_cpus > 0:
        fits.append(ray_cpus / ing.num_cpus)
    per_pod = math.floor(min(fits)) if fits else 0
    _, i_hi = _replica_bounds(ing)
    if g.get("maxReplicas", 0) * per_pod < i_hi:
        problems.append(f"{name}: {g.get('maxReplicas')} pods x {per_pod} ingress replicas each cannot hold "
                        f"ingress max_replicas {i_hi}")
    need = _ingress_cpus_needed(est, hi, assumed)
    floor_cpus = g.get("minReplicas", 0) * pod_cpus
    if need > floor_cpus:
        problems.append(
            f"{name}: minReplicas {g.get('minReplicas')} pods x {pod_cpus:g} CPUs requested = {floor_cpus:g} CPUs, "
            f"but {hi} engine replicas at full load need {need:.2f} ingress CPUs")
    return problems


# --- output ------------------------------------------------------------------------------------------------


def _fmt(f: Figure) -> str:
    v, u = f.value, f.unit
    if v is None:
        return "n/a"
    if u == "B" and v >= 1e6:
        return f"{v / 1e9:.2f} GB" if v >= 1e8 else f"{v:,.0f} B"
    if u == "B/s":
        return f"{v / 1e9:g} GB/s"
    if u == "FLOP/s":
        return f"{v / 1e12:g} TFLOPS"
    if u == "FLOP":
        return f"{v / 1e12:.1f} TFLOP"
    if u in ("s", "CPU-s") and v < 1:
        return f"{v * 1e3:.1f} ms" + (" CPU" if u == "CPU-s" else "")
    if u == "s":
        return f"{v:.1f} s"
    if u in ("tokens/s", "polls"):
        return f"{v:,.0f} {u}"
    if isinstance(v, int) or float(v).is_integer():
        return f"{v:,.0f} {u}".rstrip()
    return f"{v:.2f} {u}".rstrip()


def to_json(est: Estimate, problems: list[str], config: str, rayservice: str | None, workload: Workload) -> dict:
    return {
        "config": config,
        "rayservice": rayservice,
        "gpu": asdict(L40S),
        "workload": asdict(workload),
        "figures": {f.key: {"value": f.value, "unit": f.unit, "source": f.source, "label": f.label, "how": f.how}
                    for f in est.figures},
        "problems": problems,
        "agrees": not problems,
    }


def render(est: Estimate, problems: list[str], config: str, rayservice: str | None, workload: Workload,
           source: str = "llava-hf/llava-1.5-13b-hf") -> str:
    lines = [] if "llava-1.5-13b" in source.lower() else [
        f"note: {config} serves {source}; the figures below are {LLAVA_15_13B.name}'s, as production serves it."]
    lines += [
        f"Capacity of {config} on {L40S.name} ({LLAVA_15_13B.name}); workload {workload.rps:g} req/s, "
        f"{workload.prompt_tokens} text + {est.image_tokens} image prompt tokens, {workload.output_tokens} output "
        "tokens.",
        "source: datasheet = the GPU's published figures; config = the config file; workload = the command's "
        "flags; assumed = stated estimates; measured = `make bench` on the 2-core CPU box; computed = from those "
        "and LLaVA-1.5-13B's published architecture (the formula shows the numbers).",
        "",
    ]
    width = max(len(f.label) for f in est.figures)
    vw = max(len(_fmt(f)) for f in est.figures)
    for f in est.figures:
        lines.append(f"  {f.label:<{width}}  {_fmt(f):>{vw}}  {f.source:<12}  {f.how}".rstrip())
    lines.append("")
    lines.append(
        f"One engine replica: batch {est.batch}, ~{est.replica_rps:.2f} req/s, ~{est.replica_output_tokens_s:.0f} "
        f"output tokens/s; it needs {est.ingress_cpus_per_replica:.2f} ingress CPUs "
        f"({est.ingress_cpus_per_replica * ASSUMED.headroom:.2f} with headroom). "
        f"The workload needs {est.gpus_needed if est.gpus_needed is not None else 'n/a'} GPUs and "
        f"{est.ingress_cpus * ASSUMED.headroom:.2f} ingress CPUs (with headroom).")
    checked = f"{config}" + (f" and {rayservice}" if rayservice else " (no RayService checked)")
    if problems:
        lines.append(f"DISAGREES: {checked}")
        lines += [f"  {p}" for p in problems]
    else:
        lines.append(f"AGREES: {checked} agree with the model.")
    return "\n".join(lines)
