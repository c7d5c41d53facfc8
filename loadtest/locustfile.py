"""Locust users for the three APIs, as their real clients drive them.

  fal run      POST /fal-ai/llavav15-13b                      (sync)
  fal stream   POST /fal-ai/llavav15-13b/stream               (SSE; time to first token as its own metric)
  fal queue    POST /queue/fal-ai/llavav15-13b, then status every 0.1 s (fal_client's poll), then the result
  eachlabs     POST /v1/prediction/, then GET it every second (the documented client loop)
  openai       POST /v1/chat/completions, half plain, half streamed with stream_options.include_usage
               (SSE; time to first token as its own metric); the model from GET /v1/models at start

Keys and target come from the command line or the environment (--fal-keys / LOADTEST_FAL_KEYS,
--eachlabs-keys / LOADTEST_EACHLABS_KEYS, --openai-keys / LOADTEST_OPENAI_KEYS, comma-separated; users
are spread over them; --host). A 429 is expected wherever the load exceeds a key's limits: it is reported
under "<name> [429]" and is not a failure. Anything else unexpected is a failure. Every admitted generation
request is logged per key (--admissions-file) for loadtest/check.py. LOADTEST_SHAPE=steady|step|spike picks
a shape (shapes.py).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections import defaultdict

from locust import HttpUser, between, events, task
from locust.exception import StopUser

import workload
from shapes import SHAPES

IMAGES = workload.images()  # generated once, at start
ADMITTED: dict[str, list[float]] = defaultdict(list)  # key -> send times of admitted generation requests
FAL_PATH = "fal-ai/llavav15-13b"
TERMINAL_EACHLABS = {"success", "error", "cancelled"}
JOB_DEADLINE_S = 300.0  # a queued job or prediction not done by then is a failure, not a hung user

if os.environ.get("LOADTEST_SHAPE"):
    LoadShape = SHAPES[os.environ["LOADTEST_SHAPE"]]  # a module-level shape class is what Locust runs


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--fal-keys", env_var="LOADTEST_FAL_KEYS", default="local-test-key",
                        help="fal keys (comma-separated) the fal users spread over")
    parser.add_argument("--eachlabs-keys", env_var="LOADTEST_EACHLABS_KEYS", default="local-each-key",
                        help="Eachlabs keys (comma-separated) the Eachlabs users spread over")
    parser.add_argument("--openai-keys", env_var="LOADTEST_OPENAI_KEYS", default="local-test-key",
                        help="OpenAI API keys (comma-separated) the OpenAI users spread over")
    parser.add_argument("--openai-model", env_var="LOADTEST_OPENAI_MODEL", default="",
                        help="the model the OpenAI users ask for (default: the first of GET /v1/models)")
    parser.add_argument("--max-new-tokens", type=int, env_var="LOADTEST_MAX_NEW_TOKENS", default=32,
                        help="output length asked for")
    parser.add_argument("--admissions-file", env_var="LOADTEST_ADMISSIONS_FILE", default="",
                        help="write {key: [send times of admitted generation requests]} here at the end")


@events.quitting.add_listener
def _write_admissions(environment, **_):
    path = environment.parsed_options.admissions_file
    if path:
        with open(path, "w") as f:
            json.dump(ADMITTED, f)


_KEY_CYCLES: dict[str, itertools.cycle] = {}


def next_key(environment, option: str) -> str:
    """The next key of a comma-separated option, round robin over the users that ask."""
    if option not in _KEY_CYCLES:
        keys = [k.strip() for k in getattr(environment.parsed_options, option).split(",") if k.strip()]
        _KEY_CYCLES[option] = itertools.cycle(keys)
    return next(_KEY_CYCLES[option])


def record(name: str, started: float, exception: Exception | None = None, length: int = 0) -> None:
    """A timing of our own (time to first token, a job end to end) reported as a Locust request."""
    events.request.fire(request_type="METRIC", name=name, response_time=(time.perf_counter() - started) * 1000,
                        response_length=length, exception=exception, context={})


class Generating(HttpUser):
    abstract = True
    wait_time = between(0.5, 2.0)
    key_option = "fal_keys"

    def on_start(self):
        self.key = next_key(self.environment, self.key_option)

    def fal_input(self) -> dict:
        return {"prompt": random.choice(workload.PROMPTS), "image_url": random.choice(IMAGES),
                "max_new_tokens": self.environment.parsed_options.max_new_tokens}

    def admitted(self, response, name: str, sent: float) -> bool:
        """Sort a generation request's answer: admitted (logged per key), 429 (expected), or a failure."""
        if response.status_code == 429:
            response.request_meta["name"] = f"{name} [429]"
            response.success()
            return False
        if response.status_code != 200:
            response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            return False
        ADMITTED[self.key].append(sent)
        return True


class FalRunUser(Generating):
    weight = 3

    @task
    def run_sync(self):
        sent = time.time()
        with self.client.post(f"/{FAL_PATH}", json=self.fal_input(), headers={"Authorization": f"Key {self.key}"},
                              name="fal run", catch_response=True) as r:
            if self.admitted(r, "fal run", sent) and r.json().get("partial") is not False:
                r.failure(f"not a final answer: {r.text[:200]}")


class FalStreamUser(Generating):
    weight = 2

    @task
    def stream(self):
        sent, started = time.time(), time.perf_counter()
        with self.client.post(f"/{FAL_PATH}/stream", json=self.fal_input(), stream=True, name="fal stream",
                              headers={"Authorization": f"Key {self.key}"}, catch_response=True) as r:
            if not self.admitted(r, "fal stream", sent):
                return
            last, first = None, True
            for line in r.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                last = json.loads(line[5:])
                if first and last.get("output"):  # the first event carrying text, as make bench counts it
                    record("fal stream: time to first token", started)
                    first = False
            if last is None or last.get("partial") is not False or last.get("error"):
                r.failure(f"stream ended without a final event: {last}")
            else:
                record("fal stream: complete", started)


class FalQueueUser(Generating):
    weight = 2

    @task
    def queue(self):
        sent, started = time.time(), time.perf_counter()
        headers = {"Authorization": f"Key {self.key}"}
        with self.client.post(f"/queue/{FAL_PATH}", json=self.fal_input(), headers=headers, name="fal submit",
                              catch_response=True) as r:
            if not self.admitted(r, "fal submit", sent):
                return
            request_id = r.json()["request_id"]
        base = f"/queue/{FAL_PATH}/requests/{request_id}"
        deadline = time.monotonic() + JOB_DEADLINE_S
        while True:  # fal_client polls every 0.1 s
            with self.client.get(f"{base}/status", headers=headers, name="fal status", catch_response=True) as s:
                if s.status_code not in (200, 202):
                    s.failure(f"HTTP {s.status_code}: {s.text[:200]}")
                    return
                status = s.json()
                if status["status"] == "COMPLETED":
                    break
                if time.monotonic() > deadline:
                    s.failure(f"job not done after {JOB_DEADLINE_S:g} s: {status['status']}")
                    return
            time.sleep(0.1)
        with self.client.get(base, headers=headers, name="fal result", catch_response=True) as res:
            if res.status_code != 200 or "output" not in res.json():
                res.failure(f"HTTP {res.status_code}: {res.text[:200]}")
                return
        record("fal queue: complete", started)


class EachlabsUser(Generating):
    weight = 2
    key_option = "eachlabs_keys"

    @task
    def predict(self):
        sent, started = time.time(), time.perf_counter()
        headers = {"X-API-Key": self.key}
        body = {"model": "llava-13b", "version": "0.0.1", "input": {
            "image": random.choice(IMAGES), "prompt": random.choice(workload.PROMPTS),
            "max_tokens": str(self.environment.parsed_options.max_new_tokens), "temperature": "0.2", "top_p": "1"}}
        with self.client.post("/v1/prediction/", json=body, headers=headers, name="eachlabs create",
                              catch_response=True) as r:
            if not self.admitted(r, "eachlabs create", sent):
                return
            prediction_id = r.json()["predictionID"]
        deadline = time.monotonic() + JOB_DEADLINE_S
        while True:  # the documented client polls every second
            time.sleep(1.0)
            with self.client.get(f"/v1/prediction/{prediction_id}", headers=headers, name="eachlabs get",
                                 catch_response=True) as g:
                if g.status_code != 200:
                    g.failure(f"HTTP {g.status_code}: {g.text[:200]}")
                    return
                p = g.json()
                if p["status"] == "error":
                    g.failure(f"prediction failed: {p.get('output')}")
                    return
                if p["status"] not in TERMINAL_EACHLABS and time.monotonic() > deadline:
                    g.failure(f"prediction not done after {JOB_DEADLINE_S:g} s: {p['status']}")
                    return
            if p["status"] in TERMINAL_EACHLABS:
                break
        record("eachlabs: complete", started)


class OpenAIUser(Generating):
    """The OpenAI SDKs' chat completions, over plain HTTP: half of them streamed (with the usage chunk)."""

    weight = 2
    key_option = "openai_keys"

    def on_start(self):
        super().on_start()
        self.headers = {"Authorization": f"Bearer {self.key}"}
        self.model = self.environment.parsed_options.openai_model
        if self.model:
            return
        with self.client.get("/v1/models", headers=self.headers, name="openai models", catch_response=True) as r:
            models = r.json().get("data") if r.status_code == 200 else None
            if not models:
                r.failure(f"no model to ask for: HTTP {r.status_code}: {r.text[:200]}")
                raise StopUser()
            self.model = models[0]["id"]

    def chat_body(self, **extra) -> dict:
        content = [{"type": "image_url", "image_url": {"url": random.choice(IMAGES)}},
                   {"type": "text", "text": random.choice(workload.PROMPTS)}]
        return {"model": self.model, "max_tokens": self.environment.parsed_options.max_new_tokens,
                "temperature": 0.2, "messages": [{"role": "user", "content": content}], **extra}

    @task
    def chat(self):
        sent = time.time()
        with self.client.post("/v1/chat/completions", json=self.chat_body(), headers=self.headers,
                              name="openai chat", catch_response=True) as r:
            if not self.admitted(r, "openai chat", sent):
                return
            completion = r.json()
            choices = completion.get("choices") or [{}]
            if completion.get("object") != "chat.completion" or not choices[0].get("finish_reason"):
                r.failure(f"not a finished completion: {r.text[:200]}")
            elif not (completion.get("usage") or {}).get("completion_tokens"):
                r.failure(f"no usage: {r.text[:200]}")

    @task
    def stream(self):
        sent, started = time.time(), time.perf_counter()
        body = self.chat_body(stream=True, stream_options={"include_usage": True})
        with self.client.post("/v1/chat/completions", json=body, stream=True, name="openai stream",
                              headers=self.headers, catch_response=True) as r:
            if not self.admitted(r, "openai stream", sent):
                return
            first, finish, usage, done = True, None, None, False
            for line in r.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.failure(f"error in the stream: {chunk['error']}")
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    if first and choice.get("delta", {}).get("content"):  # the first chunk carrying text
                        record("openai stream: time to first token", started)
                        first = False
                    finish = choice.get("finish_reason") or finish
            if not (done and finish and usage and usage.get("completion_tokens")):
                r.failure(f"stream ended without a finish, the usage and [DONE]: finish={finish} usage={usage} "
                          f"done={done}")
            else:
                record("openai stream: complete", started)
