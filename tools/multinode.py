"""The production layout of k8s/rayservice.yaml as separate Ray nodes on one machine (docs/kubernetes.md,
"Rehearsing the layout on one machine"): `make rehearse` for people, tests/multinode for the suite.

    python tools/multinode.py    # start the cluster, deploy, check placement and every proxy; Ctrl-C tears down

A head with the head group's rayStartParams (num-cpus 0: it takes no work) and the dashboard, one Ray node
per pod of each worker group (`replicas` in the manifest), each started with `ray start` and its group's
rayStartParams, and the Serve config `render-k8s` writes into the manifest (serve.k8s.serve_config) with what
one CPU machine cannot run swapped (`rehearsal_config`), submitted to the dashboard's Serve REST API as
KubeRay submits serveConfigV2. Everything lives in one temporary folder; every process a node runs is found
by the session its `ray start` was given, and stop() kills those and nothing else.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loadtest"))
import stack  # noqa: E402  (loadtest/stack.py: the private redis-server)

from serve.config import ServeConfig, parse_config  # noqa: E402
from serve.deployment import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, deployment_options, ray_env  # noqa: E402
from serve.k8s import serve_config  # noqa: E402

MANIFEST = ROOT / "k8s" / "rayservice.yaml"
PROD = ROOT / "configs" / "llava-1.5-13b-l40s.yaml"  # what `make k8s` renders into the manifest
LOCAL = ROOT / "configs" / "local-cpu.yaml"
TINY = ROOT / ".cache" / "tiny-llava"
SAMPLE = ROOT / "examples" / "sample.jpg"
DEV_KEYS = ROOT / "configs" / "keys.local.yaml"
RAY = Path(sys.executable).parent / "ray"
# What stands for a GPU on a machine without one: the engine group's nodes offer it as many times as they
# offer GPUs, and an engine replica asks for it as it asks for a GPU, so it lands where it would.
GPU_STANDIN = "rehearsal_gpu"
# All nodes share this machine's /dev/shm: each node's object store is kept small (requests carry one image).
OBJECT_STORE_BYTES = 256 * 1024 * 1024
DEPLOY_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rehearsal_config(raw: dict, *, model: Path, port: int, public_base_url: str, keys_file: Path,
                     redis_url: str) -> dict:
    """The production config with what one CPU machine cannot run swapped, and nothing else: the tiny model and
    configs/local-cpu.yaml's vLLM CPU settings and engine CPUs; the engine's GPU for GPU_STANDIN; Serve's
    address, the public URL, the keys file and Redis for this machine's."""
    local = yaml.safe_load(LOCAL.read_text())
    out = copy.deepcopy(raw)
    out["model"] = {**local["model"], "source": str(model)}
    out["engine"] = local["engine"]
    engine = out["engine_deployment"]
    engine["resources"] = {**engine.get("resources", {}), GPU_STANDIN: engine.get("num_gpus", 0)}
    engine.update(num_cpus=local["engine_deployment"]["num_cpus"], num_gpus=0)
    out["http"] = {**out["http"], "host": "127.0.0.1", "port": port, "public_base_url": public_base_url}
    out["auth"] = {**out["auth"], "keys_file": str(keys_file)}
    out["store"] = {**out["store"], "redis_url": redis_url}
    return out


def rehearsal(**swaps: Any) -> tuple[ServeConfig, dict]:
    """The production config with the swaps (rehearsal_config's arguments), and the Serve config `render-k8s`
    makes of it: what the rehearsal submits in place of the manifest's serveConfigV2."""
    raw = rehearsal_config(yaml.safe_load(PROD.read_text()), **swaps)
    cfg = parse_config(raw, PROD.parent, env={}, source="rehearsal config")
    return cfg, serve_config(raw, cfg)


def ray_groups() -> dict[str, dict]:
    """The manifest's Ray node groups by name ('head' for the head group)."""
    cluster = yaml.safe_load(MANIFEST.read_text())["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def offers(params: dict[str, str]) -> dict[str, float]:
    """What a node of a group offers Ray's scheduler, by its rayStartParams: CPUs, custom resources (KubeRay's
    JSON-in-a-string form), and its GPUs as GPU_STANDIN."""
    got = {"CPU": float(params.get("num-cpus", os.cpu_count())), GPU_STANDIN: float(params.get("num-gpus", 0))}
    return got | {k: float(v) for k, v in json.loads(json.loads(params.get("resources", '"{}"'))).items()}


def start_args(params: dict[str, str]) -> list[str]:
    """`ray start` options for a group's rayStartParams, swapped as rehearsal_config swaps the config: GPUs for
    GPU_STANDIN, the dashboard on loopback, a small object store."""
    custom = {k: v for k, v in offers(params).items() if k != "CPU" and v}
    params = {k: v for k, v in params.items() if k not in ("resources", "num-gpus")}
    if "dashboard-host" in params:
        params["dashboard-host"] = "127.0.0.1"
    params["object-store-memory"] = str(OBJECT_STORE_BYTES)
    args = [f"--{k}={v}" for k, v in params.items()]
    return args + [f"--resources={json.dumps(custom)}"] if custom else args


@dataclass
class Node:
    name: str  # the group's name and the pod's number: cpu-ingress-1
    group: str
    http_port: int  # its Serve proxy (HAProxy)
    env: dict[str, str]
    args: list[str]
    node_id: str = ""
    manager_port: int = 0  # its raylet's
    session: int = 0  # the session id of every process it runs
    alive: bool = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@dataclass
class Cluster:
    """The cluster, started by start() and stopped (every process of it killed) by stop()."""

    keys_file: Path = DEV_KEYS
    model_dir: Path = TINY
    workdir: Path | None = None  # set by start(): a folder of its own
    nodes: list[Node] = field(default_factory=list)  # every node started, the lost ones too
    gcs_port: int = 0
    dashboard: str = ""
    cfg: ServeConfig | None = None
    submitted: dict = field(default_factory=dict)  # the Serve config sent to the dashboard's Serve REST API
    timings: dict[str, float] = field(default_factory=dict)
    _exit: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    # -- the cluster's life --------------------------------------------------------------------------------

    def start(self) -> None:
        began = time.monotonic()
        # Short (HAProxy's socket paths below), and never another Ray's /tmp/ray.
        self.workdir = Path(tempfile.mkdtemp(prefix="rehearse-", dir="/tmp"))
        self._exit.callback(shutil.rmtree, self.workdir, ignore_errors=True)
        redis_dir = self.workdir / "redis"
        redis_dir.mkdir()
        redis_url = self._exit.enter_context(stack.redis_server(redis_dir))
        self._exit.callback(self._kill_all)
        groups = ray_groups()
        workers = [(g, i) for g in groups if g != "head" for i in range(1, groups[g].get("replicas", 1) + 1)]
        ports = {f"{g}-{i}": free_port() for g, i in workers}
        head_port = free_port()
        first_ingress = next(p for name, p in ports.items() if name.startswith("cpu-ingress"))
        self.cfg, self.submitted = rehearsal(model=self.model_dir, port=head_port, keys_file=self.keys_file,
                                             public_base_url=f"http://127.0.0.1:{first_ingress}", redis_url=redis_url)
        self.gcs_port, dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        self._start_node(Node("head", "head", head_port, self._env("head", "head"), [
            "--head", f"--port={self.gcs_port}", "--include-dashboard=true", f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}", *start_args(groups["head"]["rayStartParams"])]))
        for group, i in workers:
            self._start_node(self._new_node(group, f"{group}-{i}", ports[f"{group}-{i}"]))
        self.timings["nodes up"] = time.monotonic() - began
        # Once every node is up: Serve spreads replicas over the nodes there are when it places them and never moves
        # them. KubeRay submits serveConfigV2 once the head is ready; sooner here, both ingress replicas were seen
        # sharing the first ingress node to join (docs/kubernetes.md).
        resp = requests.put(f"{self.dashboard}/api/serve/applications/", json=self.submitted, timeout=60)
        assert resp.status_code == 200, resp.text
        self._wait_for(self.running, DEPLOY_TIMEOUT_S, "the application RUNNING")
        self.timings["deployed"] = time.monotonic() - began

    def stop(self) -> None:
        self._exit.close()

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _env(self, group: str, name: str, http_port: int | None = None) -> dict[str, str]:
        """A node's environment: what KubeRay gives every Ray pod (its group and pod name: Ray labels the node
        ray.io/node-group and reports the name as its instance id), what every Ray process of the production
        cluster gets (ray_env), and ports and files of its own where nodes on one machine would share Serve's
        defaults."""
        # HAProxy's files, per node (Serve adds the node's 56-character id to each path): a short folder, since
        # HAProxy refuses socket paths over 97 characters.
        haproxy = self.workdir / "h"
        # RAY_AUTH_MODE: the manifest's pods hold no Ray token, so their cluster runs without one; here a token
        # left in ~/.ray by a local ray.init() would turn it on.
        env = {**os.environ, "RAY_NODE_TYPE_NAME": group, "RAY_CLOUD_INSTANCE_ID": name,
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **ray_env(self.cfg),
               "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
               "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy / "haproxy.cfg"),
               "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy / "admin.sock"),
               "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy),
               "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy / "server-state"),
               "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(haproxy / "metrics.sock")}
        env.pop("RAY_ADDRESS", None)
        if group != "head":  # the head's proxy takes http_options.port, the workers' this (Serve's override)
            env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(http_port)
        return env

    def _new_node(self, group: str, name: str, http_port: int) -> Node:
        # No log monitor of its own: the head's reads every node's logs, which share the session's folder here.
        return Node(name, group, http_port, self._env(group, name, http_port),
                    [f"--address=127.0.0.1:{self.gcs_port}", "--include-log-monitor=false",
                     *start_args(ray_groups()[group]["rayStartParams"])])

    def add_node(self, group: str) -> Node:
        """Start one more node of a worker group, as KubeRay starts a pod of it."""
        node = self._new_node(group, f"{group}-{1 + sum(n.group == group for n in self.nodes)}", free_port())
        self._start_node(node)
        return node

    def restart_node(self, node: Node) -> Node:
        """A node of the same group, name, resources and proxy port, as KubeRay replaces a lost pod."""
        assert not node.alive
        new = Node(node.name, node.group, node.http_port, node.env, node.args)  # same name: same instance id
        self._start_node(new)
        return new

    def _start_node(self, node: Node) -> None:
        """`ray start` of a node (one at a time: a few at once time out registering on a small machine)."""
        # Every option whose default is a fixed port gets a port of its own; --temp-dir: all of it in workdir.
        node.manager_port = free_port()
        args = [str(RAY), "start", f"--temp-dir={self.workdir}", "--disable-usage-stats", "--min-worker-port=0",
                "--max-worker-port=0", f"--node-manager-port={node.manager_port}", "--dashboard-agent-listen-port=0",
                *node.args]
        log = self.workdir / f"ray-start-{node.name}.log"
        with open(log, "ab") as out:
            # A session of its own: every process the node runs inherits it (the raylet, its workers, HAProxy).
            proc = subprocess.Popen(args, cwd=ROOT, env=node.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        node.session = proc.pid
        self.nodes.append(node)
        if proc.wait(timeout=120) != 0:
            raise RuntimeError(f"ray start of {node.name} failed: {log.read_text()[-3000:]}")
        known = {n.node_id for n in self.nodes}  # a lost node of the same name may not be declared dead yet
        node.node_id = self._wait_for(lambda: self._alive_node_id(node.name, known), 60, f"node {node.name} alive")

    # -- what it runs ------------------------------------------------------------------------------------

    def _alive_node_id(self, name: str, known: set[str]) -> str | None:
        """The id of a live node started as `name` (its instance id, as KubeRay gives a node its pod's name), other
        than the `known` ones."""
        from ray._raylet import GcsClient  # as Serve's controller reads the nodes
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        nodes = GcsClient(address=f"127.0.0.1:{self.gcs_port}").get_all_node_info(timeout=30)
        return next((node_id.hex() for node_id, info in nodes.items()
                     if info.instance_id == name and info.state == GcsNodeInfo.ALIVE and node_id.hex() not in known),
                    None)

    def node(self, name: str) -> Node:
        (found,) = [n for n in self.nodes if n.name == name and n.alive]
        return found

    def serve_details(self) -> dict:
        resp = requests.get(f"{self.dashboard}/api/serve/applications/", timeout=30)
        resp.raise_for_status()
        return resp.json()

    def running(self) -> bool:
        app = self.serve_details().get("applications", {}).get(self.cfg.app_name)
        if app is not None and app["status"] in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"application {app['status']}: {app.get('message')}")
        return app is not None and app["status"] == "RUNNING"

    def replica_details(self, deployment: str) -> list[dict]:
        """A deployment's replicas as Serve details them, with `node`: the name of the node each runs on."""
        names = {n.node_id: n.name for n in self.nodes}
        app = self.serve_details()["applications"][self.cfg.app_name]
        return [{**r, "node": names.get(r.get("node_id"), r.get("node_id"))}
                for r in app["deployments"][deployment]["replicas"]]

    def replicas(self) -> dict[str, list[tuple[str, str]]]:
        """Each deployment's replicas as (the name of the node it runs on, its state)."""
        return {dep: [(r["node"], r["state"]) for r in self.replica_details(dep)]
                for dep in (ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT)}

    def groups_for(self, deployment: str) -> set[str]:
        """The node groups a deployment's replicas belong on: those whose nodes offer all that one asks for."""
        actor = deployment_options(self.cfg)[deployment]["ray_actor_options"]
        asks = {"CPU": actor["num_cpus"], **actor.get("resources", {})}
        return {name for name, g in ray_groups().items()
                if all(offers(g["rayStartParams"]).get(r, 0) >= n for r, n in asks.items())}

    def misplaced(self) -> list[str]:
        """Replicas running on a node outside their deployment's groups (none, when Ray placed them as it would on
        the RayService)."""
        group = {n.node_id: n.group for n in self.nodes}
        return [f"{dep} replica {r['replica_id']} on {r['node']}" for dep in (ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT)
                for r in self.replica_details(dep) if group.get(r["node_id"]) not in self.groups_for(dep)]

    def api_problems(self, node: Node, key: str, each_key: str) -> list[str]:
        """One short generation through each API, through a node's proxy: what did not answer as it should."""
        image = "data:image/jpeg;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()
        prompt = "What is in this picture?"
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": prompt}]
        calls = {
            "fal run": ("/fal-ai/llavav15-13b", {"Authorization": f"Key {key}"},
                        {"prompt": prompt, "image_url": image, "max_new_tokens": 4}),
            "openai chat": ("/v1/chat/completions", {"Authorization": f"Bearer {key}"},
                            {"model": self.cfg.model.served_name, "max_tokens": 4,
                             "messages": [{"role": "user", "content": content}]}),
            "eachlabs create": ("/v1/prediction/", {"X-API-Key": each_key},
                                {"model": "llava-13b", "input": {"image": image, "prompt": prompt, "max_tokens": 4}}),
        }
        problems, created = [], None
        for name, (path, headers, body) in calls.items():
            try:
                resp = requests.post(f"{node.url}{path}", json=body, headers=headers, timeout=120)
            except requests.RequestException as exc:
                problems.append(f"{name}: no answer ({type(exc).__name__})")
                continue
            if resp.status_code != 200:
                problems.append(f"{name}: {resp.status_code} {resp.text[:200]}")
            elif name == "eachlabs create":
                created = resp.json()["predictionID"]
        if created:  # an Eachlabs prediction runs as a job: poll it to its end, as its clients do
            status, deadline = None, time.monotonic() + 60
            while status not in ("success", "error", "cancelled") and time.monotonic() < deadline:
                time.sleep(0.5)
                status = requests.get(f"{node.url}/v1/prediction/{created}", headers={"X-API-Key": each_key},
                                      timeout=30).json()["status"]
            if status != "success":
                problems.append(f"eachlabs prediction: {status}")
        return problems

    def actors_on(self, node: Node) -> list[str]:
        """The class names of the live actors on a node."""
        resp = requests.get(f"{self.dashboard}/api/v0/actors", timeout=30,
                            params={"limit": 10000, "filter_keys": ["node_id", "state"],
                                    "filter_predicates": ["=", "="], "filter_values": [node.node_id, "ALIVE"]})
        resp.raise_for_status()
        return sorted(a["class_name"] for a in resp.json()["data"]["result"]["result"])

    # -- faults ------------------------------------------------------------------------------------------

    def processes(self, node: Node) -> list[int]:
        """The node's processes: those in its session, and their descendants (a process may start its own)."""
        table = process_table()
        found = {pid for pid, (_, sid) in table.items() if sid == node.session}
        while True:
            more = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
            if not more:
                return sorted(found)
            found |= more

    def raylet(self, node: Node) -> int:
        """The node's raylet, by its command line (`--node_manager_port=<port>`, the port GCS knows it by)."""
        mark = f"--node_manager_port={node.manager_port}".encode()
        (pid,) = [pid for pid in self.processes(node) if mark in cmdline(pid) and b"raylet" in cmdline(pid)]
        return pid

    def kill_node(self, node: Node) -> list[int]:
        """kill -9 of the node's raylet and every process of the node at once, as a machine is lost."""
        pids = kill(self.processes(node))
        node.alive = False
        return pids

    def drain_node(self, node: Node, deadline_s: int) -> None:
        """What the pods' preStop hook runs (k8s/rayservice.yaml), naming the node: on one machine `ray
        drain-node` cannot tell which node is its own."""
        subprocess.run([str(RAY), "drain-node", f"--address=127.0.0.1:{self.gcs_port}", f"--node-id={node.node_id}",
                        "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=pod terminating",
                        f"--deadline-remaining-seconds={deadline_s}"], check=True, env=node.env, timeout=60,
                       capture_output=True)

    def leftovers(self) -> list[str]:
        """Processes of the cluster still running (none after stop()): in a node's session, or naming its folder."""
        if self.workdir is None:
            return []
        sessions, mark = {n.session for n in self.nodes}, str(self.workdir).encode()
        return [f"{pid} {cmdline(pid)[:200].decode(errors='replace')}" for pid, (_, sid) in process_table().items()
                if pid != os.getpid() and (sid in sessions or mark in cmdline(pid))]

    def _kill_all(self) -> None:
        for _ in range(50):  # until none is left: a process may have started one between the scan and the kill
            pids = {pid for node in self.nodes for pid in self.processes(node)}
            if not pids:
                break
            kill(sorted(pids))
            time.sleep(0.2)
        for node in self.nodes:
            node.alive = False

    @staticmethod
    def _wait_for(check, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while True:
            got = check()
            if got:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
            time.sleep(0.5)


def process_table() -> dict[int, tuple[int, int]]:
    """Every live process: pid -> (parent's pid, session id)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if fields[0] != "Z":  # a zombie has exited already
                out[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return out


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def kill(pids: list[int]) -> list[int]:
    """SIGSTOP all first, so that none starts another meanwhile, then SIGKILL."""
    pids = [p for p in pids if p != os.getpid()]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    return pids


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    # Tear down on Ctrl-C and on SIGTERM, also when started where SIGINT is ignored (a shell's background job).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    keys = {k["name"]: k["key"] for k in yaml.safe_load(DEV_KEYS.read_text())}
    with Cluster() as cluster:
        print(f"{len(cluster.nodes)} Ray nodes up in {cluster.timings['nodes up']:.0f} s, the application RUNNING "
              f"{cluster.timings['deployed']:.0f} s after the start; the dashboard: {cluster.dashboard}")
        problems = cluster.misplaced()
        for node in cluster.nodes:
            on_it = [dep for dep in (ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT)
                     for r in cluster.replica_details(dep) if r["node"] == node.name]
            line = f"  {node.name:14} proxy {node.url}  {', '.join(on_it) or 'no replica'}"
            if node.group != "head":
                failed = cluster.api_problems(node, keys["local-dev"], keys["local-eachlabs"])
                problems += [f"{node.name}: {p}" for p in failed]
                line += "; fal, Eachlabs, OpenAI: " + ("failed" if failed else "answered")
            print(line)
        print("problems: " + ("; ".join(problems) if problems else "none"))
        print("serving with the development keys (configs/keys.local.yaml) until Ctrl-C")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
