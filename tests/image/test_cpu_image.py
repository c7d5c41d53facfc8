"""The CPU image, built from this checkout and run as a user runs it (docs/images.md): every API answers
from inside the container, the service runs as the non-root uid, the image's HEALTHCHECK passes, and SIGTERM
lets an in-flight request finish, then exits 0. Docker when a daemon answers, else buildah and podman."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests
from openai import OpenAI

from tests.conftest import LOCAL_KEY, ROOT, data_uri, free_port

sys.path.insert(0, str(ROOT / "tools"))
import image as images  # noqa: E402

TAG = "llava-serve-cpu:test"
READY_S = 300  # a cold start on 2 cores is about a minute (docs/images.md)
GRACE_S = 60


@pytest.fixture(scope="module")
def built(report_cost):
    started = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "tools" / "image.py"), "build", "cpu", "--tag", TAG], check=True)
    size = images.image_size(TAG)
    report_cost(f"CPU image: built in {time.monotonic() - started:.0f} s, {size / 1e9:.2f} GB")
    return TAG


@pytest.fixture(scope="module")
def container(built, tmp_path_factory, report_cost):
    port = free_port()
    name = f"llava-image-test-{port}"
    log = (tmp_path_factory.mktemp("image") / "container.log").open("w+")
    proc = subprocess.Popen(images.run_args(built, port, name), env=images.podman_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    base, started = f"http://127.0.0.1:{port}", time.monotonic()
    try:
        while True:
            try:
                if requests.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            log.seek(0)
            assert proc.poll() is None and time.monotonic() - started < READY_S, log.read()[-6000:]
            time.sleep(1)
        report_cost(f"CPU image: ready {time.monotonic() - started:.0f} s after `run`")
        yield base, name, proc
    finally:
        subprocess.run([images.engine(), "rm", "-f", name], env=images.podman_env(),
                       capture_output=True, check=False)
        proc.wait(timeout=60)


def in_container(name: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([images.engine(), "exec", name, *cmd], env=images.podman_env(), capture_output=True,
                          text=True, check=False)


def test_every_api_answers_from_inside_the_container(container):
    base, _, _ = container
    fal = requests.post(f"{base}/fal-ai/llavav15-13b", headers={"Authorization": f"Key {LOCAL_KEY}"}, timeout=120,
                        json={"prompt": "What is this?", "image_url": data_uri(), "max_new_tokens": 8, "temperature": 0})
    assert fal.status_code == 200 and fal.json()["stats"]["num_output_tokens"] == 8, fal.text

    each = {"X-API-Key": "local-each-key"}
    created = requests.post(f"{base}/v1/prediction/", headers=each, timeout=30, json={
        "model": "llava-13b", "version": "0.0.1", "input": {"image": data_uri(), "prompt": "Describe", "max_tokens": 4}})
    assert created.status_code == 200, created.text
    deadline = time.monotonic() + 120
    while (got := requests.get(f"{base}/v1/prediction/{created.json()['predictionID']}", headers=each,
                               timeout=30).json())["status"] not in ("success", "error", "cancelled"):
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
    assert got["status"] == "success" and len(got["output"]) >= 1, got

    with OpenAI(base_url=f"{base}/v1", api_key=LOCAL_KEY, max_retries=0) as client:
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(model=model, max_tokens=6, temperature=0, messages=[{
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri()}},
                                        {"type": "text", "text": "What is this?"}]}])
    assert answer.usage.completion_tokens == 6 and answer.usage.prompt_tokens > 576


def test_the_service_runs_as_the_non_root_user(container):
    _, name, _ = container
    status = in_container(name, "cat", "/proc/1/status")  # the service itself: the container's first process
    uids = next(line.split()[1:] for line in status.stdout.splitlines() if line.startswith("Uid:"))
    assert status.returncode == 0 and set(uids) == {"10001"}, status


def test_the_images_healthcheck_passes(container):
    _, name, _ = container
    if images.engine() == "podman":  # its timers need systemd; running the check by hand does not
        check = subprocess.run(["podman", "healthcheck", "run", name], env=images.podman_env(), capture_output=True,
                               text=True, check=False)
    else:
        cmd = subprocess.run(["docker", "inspect", "--format", "{{json .Config.Healthcheck.Test}}", name],
                             capture_output=True, text=True, check=True).stdout
        check = in_container(name, *json.loads(cmd)[1:])
    assert check.returncode == 0, check


def test_sigterm_lets_an_in_flight_request_finish_then_exits_0(container, report_cost):
    """Last: it stops the container. A stream that has begun when the container is told to stop completes."""
    base, name, proc = container
    body = {"prompt": "Describe.", "image_url": data_uri(), "max_new_tokens": 2048, "temperature": 0}
    with requests.post(f"{base}/fal-ai/llavav15-13b/stream", headers={"Authorization": f"Key {LOCAL_KEY}"},
                       json=body, stream=True, timeout=GRACE_S) as resp:
        assert resp.status_code == 200, resp.text
        events = (json.loads(line[len(b"data: "):]) for line in resp.iter_lines() if line.startswith(b"data: "))
        assert next(events)["partial"] is True  # generating: in flight for sure
        subprocess.run([images.engine(), "kill", "--signal", "TERM", name], env=images.podman_env(), check=True,
                       capture_output=True)
        stopping = time.monotonic()
        *_, last = events
    assert last["partial"] is False and last["stats"]["num_output_tokens"] == 2048, last
    assert proc.wait(timeout=GRACE_S) == 0
    report_cost(f"CPU image: exited 0 {time.monotonic() - stopping:.0f} s after SIGTERM, its stream finished")
