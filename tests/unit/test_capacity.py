"""The capacity model (serve/capacity.py, docs/capacity.md): its arithmetic against published architecture
figures, the command as users run it, the shipped config and k8s/ held to the model, and a check that fails
when they disagree."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import yaml

from serve import capacity
from serve.capacity import LLAVA_15_13B, MEASURED, Workload, check, estimate, load_rayservice
from serve.cli import main
from serve.config import load_config
from tests.conftest import CONFIGS, ROOT

PROD = CONFIGS / "llava-1.5-13b-l40s.yaml"


def prod():
    return load_config(PROD, env={})


def with_engine(cfg, **changes):
    return cfg.model_copy(update={"engine": cfg.engine.model_copy(update=changes)})


# --- arithmetic ------------------------------------------------------------------------------------------


def test_kv_bytes_per_token_is_llama_2_13b():
    # Llama-2-13B: 40 layers, 40 attention heads of 128 dimensions, no grouped-query attention; fp16.
    layers, kv, heads, head_dim, fp16 = 40, 2, 40, 128, 2
    assert LLAVA_15_13B.kv_bytes_per_token(fp16) == layers * kv * heads * head_dim * fp16 == 819_200
    assert LLAVA_15_13B.head_dim == 5120 // 40 == 128
    assert capacity.dtype_bytes("float16") == capacity.dtype_bytes("auto") == 2
    assert capacity.dtype_bytes("float16", "fp8_e4m3") == 1
    assert estimate(with_engine(prod(), kv_cache_dtype="fp8")).kv_bytes_per_token == 409_600


def test_parameter_counts_match_the_published_models():
    # Llama-2-13B with its own 32,000-token vocabulary is 13,015,864,320 parameters; CLIP ViT-L/14 at 336 px
    # has 303.5 M in its vision tower; LLaVA-1.5's projector is Linear(1024, 5120) + Linear(5120, 5120).
    assert dataclasses.replace(LLAVA_15_13B, vocab=32000).llm_params() == 13_015_864_320
    assert LLAVA_15_13B.vision_params() == 303_507_456
    assert LLAVA_15_13B.projector_params() == 1024 * 5120 + 5120 + 5120 * 5120 + 5120
    assert 13.3e9 < LLAVA_15_13B.params() < 13.4e9
    assert LLAVA_15_13B.image_tokens == 576


def test_the_figures_follow_the_formulas():
    cfg = prod()
    est = estimate(cfg, Workload(rps=4, prompt_tokens=60, output_tokens=200))
    assert est.request_tokens == 576 + 60 + 200
    assert est.kv_budget_bytes == 0.9 * 48e9 - est.weights_bytes - capacity.ASSUMED.reserve_bytes
    assert est.kv_bound == int(est.kv_budget_bytes // (819_200 * 836))
    assert est.batch == min(cfg.engine.max_num_seqs, est.kv_bound)
    step = (est.decode_weights_bytes + est.batch * (576 + 60 + 100) * 819_200) / 864e9
    assert abs(est.step_s - step) < 1e-12
    assert abs(est.replica_rps - 1 / (est.prefill_s + 200 * step / est.batch)) < 1e-9
    per_request = MEASURED["sync_request_cpu_s"].value + est.polls_per_request * MEASURED["status_poll_cpu_s"].value
    assert est.polls_per_request >= MEASURED["polls_per_request"].value
    assert abs(est.ingress_cpus - 4 * per_request) < 1e-9
    # Every figure says where it comes from, in the words the output explains.
    assert {f.source for f in est.figures} == {"datasheet", "config", "workload", "assumed", "measured", "computed"}
    assert {f.key for f in est.figures if f.source == "measured"} == set(MEASURED)


# --- the shipped config ----------------------------------------------------------------------------------


def test_the_shipped_config_and_k8s_agree_with_the_model():
    cfg = prod()
    est = estimate(cfg)
    assert cfg.engine.max_num_seqs <= est.kv_bound  # a full batch fits the KV cache at the default lengths
    assert est.full_context_bound >= 1  # vLLM starts: one full-length sequence fits
    assert cfg.engine_deployment.autoscaling.target_ongoing_requests <= est.batch
    assert check(cfg, rayservice=load_rayservice(capacity.RAYSERVICE)) == []


def test_the_command_runs_on_the_shipped_config(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["capacity"]) == 0
    out = capsys.readouterr().out
    assert "AGREES: configs/llava-1.5-13b-l40s.yaml and k8s/rayservice.yaml agree with the model." in out
    for words in ("KV-bound concurrency", "decode step floor", "requests/s per replica", "GPUs (engine replicas)",
                  "ingress CPUs per engine replica", "measured", "computed", "config"):
        assert words in out


def test_the_installed_script_prints_json():
    script = Path(sys.executable).parent / "llava-serve"
    res = subprocess.run([str(script), "capacity", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["agrees"] is True and report["problems"] == []
    assert report["rayservice"] == "k8s/rayservice.yaml"
    figures = report["figures"]
    for key in ("kv_bytes_per_token", "kv_budget_bytes", "kv_bound", "full_context_bound", "step_s",
                "decode_tokens_s", "prefill_s", "replica_rps", "replica_output_tokens_s", "gpus_needed",
                "ingress_cpus", "ingress_cpus_per_replica"):
        assert figures[key]["source"] == "computed" and figures[key]["value"] > 0, key
    assert figures["kv_bytes_per_token"]["value"] == 819_200
    assert figures["max_num_seqs"] == {**figures["max_num_seqs"], "value": 20, "source": "config"}
    assert figures["status_poll_cpu_s"]["source"] == "measured"


# --- the check fails when it should --------------------------------------------------------------------


def write_config(tmp_path, **engine) -> Path:
    data = yaml.safe_load(PROD.read_text())
    data["engine"].update(engine)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_batch_far_above_the_kv_bound_fails(tmp_path, capsys):
    assert main(["capacity", str(write_config(tmp_path, max_num_seqs=128))]) == 1
    out = capsys.readouterr().out
    assert "DISAGREES" in out and "engine.max_num_seqs: 128 sequences, but the KV cache holds 20 of 836" in out


def test_longer_answers_than_the_config_was_sized_for_fail(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["capacity", "--output-tokens", "1024", "--no-k8s"]) == 1
    assert "engine.max_num_seqs: 20 sequences, but the KV cache holds 10 of 1660" in capsys.readouterr().out


def test_a_memory_share_that_leaves_no_kv_room_fails(tmp_path, capsys):
    assert main(["capacity", str(write_config(tmp_path, gpu_memory_utilization=0.6)), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["figures"]["kv_budget_bytes"]["value"] < 0 and report["figures"]["kv_bound"]["value"] == 0
    assert any(p.startswith("engine.gpu_memory_utilization: 0.6 x 48 GB leaves no room for the KV cache")
               for p in report["problems"])
    assert any(p.startswith("engine.max_num_seqs:") for p in report["problems"])


def test_a_rayservice_that_starves_the_ingress_or_packs_gpus_fails():
    cfg = prod()
    svc = copy.deepcopy(load_rayservice(capacity.RAYSERVICE))
    groups = {g["groupName"]: g for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    groups["cpu-ingress"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "250m"
    groups["gpu-l40s"]["rayStartParams"]["num-gpus"] = "2"
    groups["gpu-l40s"]["maxReplicas"] = 2
    problems = check(cfg, rayservice=svc)
    assert any("cpu-ingress: the pod requests 0.25 CPUs but Ray schedules 2" in p for p in problems), problems
    assert any("cpu-ingress: minReplicas 2 pods x 0.25 CPUs requested = 0.5 CPUs, but 4 engine replicas" in p
               for p in problems), problems
    assert any("gpu-l40s: each pod must hold exactly one engine replica's GPUs" in p for p in problems), problems
    assert any("gpu-l40s: maxReplicas 2 pods cannot hold the engine's 4 replicas" in p for p in problems), problems


def test_too_few_ingress_cpus_or_gpus_for_the_workload_fail():
    cfg = prod()
    thin = cfg.model_copy(update={"ingress": cfg.ingress.model_copy(update={"num_cpus": 0.1})})
    assert any(p.startswith("ingress: 2 replicas x 0.1 CPUs = 0.2 CPUs, but 4 engine replicas") for p in check(thin))
    problems = check(cfg, Workload(rps=50))
    assert any(p.startswith("engine_deployment: at most 4 replicas serve") and "needs 34" in p for p in problems)
