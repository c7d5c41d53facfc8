"""k8s/, validated offline the way CI can: kustomize builds it, every object passes its schema (KubeRay's
CRD with unknown keys refused, Kubernetes' own, Ray's ServeDeploySchema), the Serve config inside is the
production config, and the hand-written rest agrees with that config."""

from __future__ import annotations

import base64
import copy
import json
import os
import secrets
import shutil
import subprocess
import sys
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from serve.app import ENGINE_DEPLOYMENT, app_builder, deployment_options, ray_env
from serve.auth import KeyRing
from serve.config import ENV_REDIS_PASSWORD, parse_config
from tests.conftest import CONFIGS, ROOT
from tests.deploy.conftest import K8S, KUBERAY_CRDS, PROD, kustomize_build, ray_groups, ray_pods

K8S_VERSION = "1.33.0"  # a Kubernetes release current KubeRay supports; kubernetes-validate ships its schemas
CLI = [sys.executable, "-m", "serve.cli"]


# --- schemas ----------------------------------------------------------------------------------------


def strict(schema):
    """A CRD schema that refuses unknown keys: additionalProperties false wherever properties are listed
    (as kubeconform's converter does), except where the schema itself allows anything."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_schema():
    crd = yaml.safe_load((KUBERAY_CRDS / "ray.io_rayservices.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))


def errors_of(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_rayservice_matches_the_kuberay_v1_crd(rayservice, rayservice_schema):
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert errors_of(rayservice_schema, rayservice) == []


@pytest.mark.parametrize(
    "path, typo",
    [
        (["spec", "rayClusterConfig", "workerGroupSpecs", 0], "minReplica"),
        (["spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0], "resource"),
        (["spec", "rayClusterConfig", "autoscalerOptions"], "idleTimeoutSecond"),
    ],
)
def test_a_misspelt_key_is_refused(rayservice, rayservice_schema, path, typo):
    doc = copy.deepcopy(rayservice)
    node = doc
    for step in path:
        node = node[step]
    node[typo] = 1
    assert any("Additional properties are not allowed" in e and typo in e for e in errors_of(rayservice_schema, doc))


def test_core_objects_pass_the_kubernetes_schemas(objects, rayservice):
    core = [o for o in objects if o["apiVersion"] not in ("ray.io/v1", "monitoring.coreos.com/v1")]
    assert {o["kind"] for o in core} >= {"Namespace", "Secret", "ConfigMap", "Service", "StatefulSet",
                                         "PersistentVolumeClaim", "Job", "PodDisruptionBudget", "NetworkPolicy"}
    serve_service = {"apiVersion": "v1", "kind": "Service", **rayservice["spec"]["serveService"]}
    for obj in [*core, *ray_pods(rayservice).values(), serve_service]:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata'].get('name')}: {exc.path}: {exc.message}")


def test_the_validators_catch_a_broken_pod(rayservice):
    pod = copy.deepcopy(ray_pods(rayservice)["gpu-l40s"])
    pod["spec"]["containers"][0]["resources"]["limits"]["memory"] = "lots"
    pod["spec"]["terminationGracePeriod"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


# --- the Serve config inside ----------------------------------------------------------------------


def serve_config_of(rayservice) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def test_serve_config_is_the_production_config_rendered(rayservice, prod):
    res = subprocess.run([*CLI, "render-k8s", "--check", str(PROD), str(K8S / "rayservice.yaml")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    (app,) = serve_config_of(rayservice)["applications"]
    assert app["args"]["config"] == yaml.safe_load(PROD.read_text())  # the file itself, verbatim
    assert parse_config(app["args"]["config"], PROD.parent, env={}) == prod
    assert {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]} == json.loads(
        json.dumps(deployment_options(prod))
    )


def test_serve_config_passes_rays_own_schema(rayservice):
    ServeDeploySchema.model_validate(serve_config_of(rayservice))


def test_the_app_inside_passes_llava_serve_check_and_builds(rayservice, tmp_path, monkeypatch):
    (app,) = serve_config_of(rayservice)["applications"]
    config = tmp_path / "from-rayservice.yaml"
    config.write_text(yaml.safe_dump(app["args"]["config"]))
    # The keys file is the Secret the ingress pods mount; point the documented override at the example keys.
    env = {**os.environ, "LLAVA_SERVE_KEYS_FILE": str(CONFIGS / "keys.local.yaml")}
    res = subprocess.run([*CLI, "check", str(config)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    assert res.returncode == 0, res.stderr
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("serve.app", "app_builder")
    assert isinstance(app_builder(app["args"]), Application)


def test_render_k8s_rewrites_only_the_serve_config(tmp_path):
    manifest = tmp_path / "rayservice.yaml"
    shutil.copy(K8S / "rayservice.yaml", manifest)
    data = yaml.safe_load(PROD.read_text())
    data["engine"]["max_num_seqs"] = 20
    config = tmp_path / "changed.yaml"
    config.write_text(yaml.safe_dump(data))

    stale = subprocess.run([*CLI, "render-k8s", "--check", str(config), str(manifest)],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert stale.returncode == 1 and "stale" in stale.stderr
    assert manifest.read_text() == (K8S / "rayservice.yaml").read_text()  # --check changes nothing

    subprocess.run([*CLI, "render-k8s", str(config), str(manifest)], check=True, cwd=ROOT, timeout=120,
                   capture_output=True)
    before, after = yaml.safe_load((K8S / "rayservice.yaml").read_text()), yaml.safe_load(manifest.read_text())
    (engine,) = [d for d in yaml.safe_load(after["spec"]["serveConfigV2"])["applications"][0]["deployments"]
                 if d["name"] == ENGINE_DEPLOYMENT]
    assert engine["max_ongoing_requests"] == 20 + 64  # a full batch and vLLM's queue
    before["spec"].pop("serveConfigV2"), after["spec"].pop("serveConfigV2")
    assert before == after
    comments = [line for line in manifest.read_text().splitlines() if line.lstrip().startswith("#")]
    assert comments == [line for line in (K8S / "rayservice.yaml").read_text().splitlines()
                        if line.lstrip().startswith("#")]


# --- the hand-written parts agree with the config -----------------------------------------------------


def ray_resources(group: dict) -> dict[str, float]:
    """The custom Ray resources a group's nodes advertise (rayStartParams' JSON-in-a-string form)."""
    raw = group["rayStartParams"].get("resources")
    return {k: float(v) for k, v in json.loads(json.loads(raw)).items()} if raw else {}


def container(group: dict) -> dict:
    (c,) = group["template"]["spec"]["containers"]
    return c


def test_engine_pods_fit_exactly_one_engine_replica_each(rayservice, prod):
    gpu = ray_groups(rayservice)["gpu-l40s"]
    dep, scaling = prod.engine_deployment, prod.engine_deployment.autoscaling
    limits = container(gpu)["resources"]["limits"]
    assert float(gpu["rayStartParams"]["num-cpus"]) == dep.num_cpus
    assert float(gpu["rayStartParams"]["num-gpus"]) == dep.num_gpus == float(limits["nvidia.com/gpu"])
    assert float(limits["cpu"]) > dep.num_cpus  # headroom for the raylet, proxy and vLLM's busy loop
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (scaling.min_replicas, scaling.max_replicas)
    spec = gpu["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L40S"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["terminationGracePeriodSeconds"] > dep.graceful_shutdown_timeout_s + 2
    shm = {v["name"]: v for v in spec["volumes"]}[
        {m["mountPath"]: m["name"] for m in container(gpu)["volumeMounts"]}["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory"


def test_ingress_replicas_land_only_on_the_cpu_group_and_fit_there(rayservice, prod):
    groups = ray_groups(rayservice)
    ing, scaling = prod.ingress, prod.ingress.autoscaling
    assert ing.resources, "ingress replicas must be pinned to the CPU group by a custom resource"
    hosts = {name for name, g in groups.items() if set(ing.resources) <= set(ray_resources(g))}
    assert hosts == {"cpu-ingress"}
    cpu = groups["cpu-ingress"]
    per_pod = min(
        [ray_resources(cpu)[r] / need for r, need in ing.resources.items()]
        + [float(cpu["rayStartParams"]["num-cpus"]) / ing.num_cpus]
    )
    assert cpu["maxReplicas"] * per_pod >= scaling.max_replicas
    assert cpu["minReplicas"] * per_pod >= scaling.min_replicas
    assert cpu["minReplicas"] >= 2  # two pods: one can drain (PDB) while the other serves
    assert cpu["template"]["spec"]["terminationGracePeriodSeconds"] > ing.graceful_shutdown_timeout_s + 2
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"


def test_http_port_keys_store_and_weights_are_wired(objects, rayservice, prod):
    groups = ray_groups(rayservice)
    for name in ("gpu-l40s", "cpu-ingress"):
        c = container(groups[name])
        assert {p["name"]: p["containerPort"] for p in c["ports"]}["serve"] == prod.http.port
        assert f"http://localhost:{prod.http.port}/-/healthz" in c["readinessProbe"]["exec"]["command"][-1]
    assert rayservice["spec"]["serveService"]["spec"]["ports"][0]["port"] == prod.http.port

    # The keys file: the Secret, mounted where auth.keys_file points, on the pods that run the ingress.
    cpu = groups["cpu-ingress"]
    mount = {m["mountPath"]: m["name"] for m in container(cpu)["volumeMounts"]}[str(prod.auth.keys_file.parent)]
    secret_name = {v["name"]: v for v in cpu["template"]["spec"]["volumes"]}[mount]["secret"]["secretName"]
    (secret,) = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == secret_name]
    assert prod.auth.keys_file.name in secret["data"]

    # store.redis_url names the Redis Service and its port.
    url = urlsplit(prod.store.redis_url)
    (redis,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == url.hostname]
    assert url.port in [p["port"] for p in redis["spec"]["ports"]]

    # The download Job fills the cache the engine pods read, with the model the config serves.
    (job,) = [o for o in objects if o["kind"] == "Job"]
    (dl,) = job["spec"]["template"]["spec"]["containers"]
    assert prod.model.source in dl["command"]
    gpu = groups["gpu-l40s"]
    env = {c["name"]: {e["name"]: e["value"] for e in c.get("env", [])} for c in (dl, container(gpu))}
    assert env[dl["name"]]["HF_HOME"] == env[container(gpu)["name"]]["HF_HOME"]

    def claim_at(pod_spec, c, path):
        volume = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}[path]
        return {v["name"]: v for v in pod_spec["volumes"]}[volume]["persistentVolumeClaim"]["claimName"]

    assert claim_at(job["spec"]["template"]["spec"], dl, "/models") == claim_at(gpu["template"]["spec"],
                                                                                 container(gpu), "/models")


def test_every_ray_pod_runs_one_image_with_the_pinned_ray(objects, rayservice):
    images = {container(g)["image"] for g in ray_groups(rayservice).values()}
    (job,) = [o for o in objects if o["kind"] == "Job"]
    assert len(images) == 1 and images == {job["spec"]["template"]["spec"]["containers"][0]["image"]}
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    assert f"ray[serve]=={ray.__version__}" in (ROOT / "requirements-runtime.txt").read_text()


def test_every_ray_process_gets_the_environment_of_the_configs_proxy(rayservice, prod):
    # Ray reads these when each process starts (the Serve config cannot set them): every pod must carry
    # them, or HAProxy on one node would route to replicas that serve no HTTP of their own.
    assert prod.http.proxy == "haproxy" and ray_env(prod)
    for name, group in ray_groups(rayservice).items():
        env = {e["name"]: e.get("value") for e in container(group).get("env", [])}
        assert {k: env.get(k) for k in ray_env(prod)} == ray_env(prod), name


def test_prometheus_scrapes_every_ray_pod_on_its_metrics_port(objects, rayservice):
    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    services = [o for o in objects if o["kind"] == "Service"
                and monitor["spec"]["selector"]["matchLabels"].items() <= o["metadata"]["labels"].items()]
    assert len(services) == 1
    (svc,) = services
    assert svc["spec"]["clusterIP"] == "None"  # one endpoint per pod: each node's own metrics
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = [p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"]]
    for name, group in ray_groups(rayservice).items():
        labels = group["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items(), name
        assert {p["name"]: p["containerPort"] for p in container(group)["ports"]}[port["targetPort"]] == 8080, name


def test_disruption_budgets_and_network_policies_select_real_pods(objects, rayservice):
    pod_labels = [g["template"]["metadata"]["labels"] for g in ray_groups(rayservice).values()]
    pod_labels += [o["spec"]["template"]["metadata"]["labels"] for o in objects if o["kind"] in ("StatefulSet", "Job")]
    for o in objects:
        if o["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = (o["spec"].get("selector") or o["spec"]["podSelector"])["matchLabels"]
            assert any(selector.items() <= labels.items() for labels in pod_labels), o["metadata"]["name"]


def secret(objects, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == name]
    return found


def test_shipped_keys_let_nobody_in(objects, prod):
    keys = secret(objects, "llava-serve-keys")["data"]["keys.yaml"]
    assert base64.b64decode(keys).decode() == (K8S / "keys.yaml").read_text()
    assert len(KeyRing.load(K8S / "keys.yaml", prod.limits)) == 0


def readme_block(first_line: str) -> str:
    """docs/kubernetes.md's fenced code block that starts with `first_line`."""
    text = (ROOT / "docs/kubernetes.md").read_text()
    start = text.index("\n" + first_line + "\n") + 1
    return text[start : text.index("```", start)]


def test_the_readmes_overlay_sets_image_keys_redis_password_and_namespaces(tmp_path, prod):
    # docs/kubernetes.md's overlay, as a reader follows it: a checkout named llava-serve beside their overlay.
    shutil.copytree(K8S, tmp_path / "llava-serve" / "k8s")
    overlay = tmp_path / "my-deploy"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(readme_block("# my-deploy/kustomization.yaml"))
    (overlay / "keys.yaml").write_text(readme_block("# my-deploy/keys.yaml"))
    make_password = readme_block("# my-deploy/redis-auth.env: Redis' password, one line; keep the file out of "
                                 "version control")
    assert 'echo "password=$(openssl rand -hex 32)" > my-deploy/redis-auth.env' in make_password
    password = secrets.token_hex(32)  # what that command writes
    (overlay / "redis-auth.env").write_text(f"password={password}\n")
    built = kustomize_build(overlay)

    (svc,) = [o for o in built if o["kind"] == "RayService"]
    (job,) = [o for o in built if o["kind"] == "Job"]
    images = {container(g)["image"] for g in ray_groups(svc).values()} | {
        job["spec"]["template"]["spec"]["containers"][0]["image"]}
    assert images == {"registry.example.com/llava-serve-gpu:0.1.0"}
    keys = base64.b64decode(secret(built, "llava-serve-keys")["data"]["keys.yaml"]).decode()
    assert keys == (overlay / "keys.yaml").read_text()
    assert len(KeyRing.load(overlay / "keys.yaml", prod.limits)) == 2  # the example keys load
    (pvc,) = [o for o in built if o["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["storageClassName"]  # the overlay picks a ReadWriteMany class
    assert base64.b64decode(secret(built, "llava-redis-auth")["data"]["password"]).decode() == password
    # The namespaces the overlay names replace the base's, and nothing is left open.
    assert unpinned_sources(built) == []
    assert sources(built, 8080) - SAME_NAMESPACE == {("monitoring", None)}
    assert sources(built, 8265) - SAME_NAMESPACE == sources(built, 52365) - SAME_NAMESPACE == {
        ("kuberay", frozenset({("app.kubernetes.io/name", "kuberay-operator")}))}


def test_pod_details_kuberay_and_the_disruption_controller_rely_on(objects, rayservice):
    groups = ray_groups(rayservice)
    for name, group in groups.items():
        spec = group["template"]["spec"]
        # KubeRay's own Services select Ray pods by app.kubernetes.io/name: the templates leave it alone.
        assert "app.kubernetes.io/name" not in group["template"]["metadata"]["labels"], name
        # Only the head needs its service account token: the autoscaler beside Ray calls the Kubernetes API.
        assert spec["automountServiceAccountToken"] is (name == "head"), name
    # Ray pods belong to a RayCluster, which has no scale subresource: only an integer minAvailable works.
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        assert set(pdb["spec"]) == {"minAvailable", "selector"} and isinstance(pdb["spec"]["minAvailable"], int)
    for o in objects:
        pod = o["spec"]["template"]["spec"] if o["kind"] in ("StatefulSet", "Job") else None
        if pod is not None:
            assert pod["automountServiceAccountToken"] is False, o["metadata"]["name"]


def test_worker_pods_drain_their_ray_node_before_they_exit(rayservice, prod):
    import re
    import shlex

    from ray.scripts.scripts import drain_node

    groups = ray_groups(rayservice)
    assert "lifecycle" not in container(groups["head"])  # the head is never drained: it is the cluster
    for name, dep in (("gpu-l40s", prod.engine_deployment), ("cpu-ingress", prod.ingress)):
        script = container(groups[name])["lifecycle"]["preStop"]["exec"]["command"][-1]
        drain, _, wait = script.partition(" && ")
        argv = shlex.split(drain)
        assert argv[:2] == ["ray", "drain-node"]
        params = drain_node.make_context("drain-node", argv[2:]).params  # Ray's own CLI parses it
        deadline = params["deadline_remaining_seconds"]
        assert params["reason"] == "DRAIN_NODE_REASON_PREEMPTION"  # accepted even while replicas run
        # Serve begins a replica's graceful stop at deadline - graceful_shutdown_timeout_s; the pod waits out
        # the deadline, and Kubernetes' grace period covers that plus Ray's exit.
        assert deadline > dep.graceful_shutdown_timeout_s
        assert re.fullmatch(r"sleep (\d+)", wait) and int(wait.split()[1]) >= deadline
        assert groups[name]["template"]["spec"]["terminationGracePeriodSeconds"] > deadline


# --- who may reach what ------------------------------------------------------------------------------


NAMESPACE_LABEL = "kubernetes.io/metadata.name"  # Kubernetes sets it on every namespace
# The ports that only one other namespace may reach: the Ray dashboard (its Jobs API runs code) and its agent
# only from the KubeRay operator's pods, the metrics port only from Prometheus' namespace.
OPERATOR_PORTS = (8265, 52365)
METRICS_PORT = 8080
SAME_NAMESPACE = {("llava-serve", frozenset({("llava-serve/ray-node", "true")}))}  # the Ray pods themselves


def named_ports(objects) -> dict[str, int]:
    """Container port names of every pod template, for rules that name their ports."""
    pods = [g["template"]["spec"] for o in objects if o["kind"] == "RayService" for g in ray_groups(o).values()]
    pods += [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("StatefulSet", "Job")]
    return {p["name"]: p["containerPort"] for pod in pods for c in pod["containers"] for p in c.get("ports", [])
            if "name" in p}


def admits_port(rule: dict, port: int, names: dict[str, int]) -> bool:
    if not rule.get("ports"):
        return True  # no ports: every port
    for p in rule["ports"]:
        first = p.get("port")
        if first is None:
            return True
        first = names.get(first, first) if isinstance(first, str) else first
        if first <= port <= p.get("endPort", first):
            return True
    return False


def pinned_namespace(selector: dict) -> str | None:
    """The one namespace a namespaceSelector selects by name, or None when it may select others."""
    named = (selector.get("matchLabels") or {}).get(NAMESPACE_LABEL)
    if named:
        return named
    exprs = [e for e in selector.get("matchExpressions") or []
             if e["key"] == NAMESPACE_LABEL and e["operator"] == "In" and len(e.get("values") or []) == 1]
    return exprs[0]["values"][0] if exprs else None


def peers_admitting(objects, port: int):
    """(policy, peer) for every ingress peer of every NetworkPolicy that admits `port`; peer None = any source."""
    names = named_ports(objects)
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        for rule in policy["spec"].get("ingress") or []:
            if admits_port(rule, port, names):
                yield from ((policy, peer) for peer in rule.get("from") or [None])


def source(policy: dict, peer: dict | None) -> tuple[str | None, frozenset | None]:
    """(namespace, pod labels) a peer admits: namespace None = not pinned to one, labels None = any pod."""
    if peer is None or "ipBlock" in peer:
        return None, None
    if "namespaceSelector" in peer:
        namespace = pinned_namespace(peer["namespaceSelector"])
    else:
        namespace = policy["metadata"]["namespace"]  # a podSelector alone selects in the policy's namespace
    labels = (peer.get("podSelector") or {}).get("matchLabels") or None
    return namespace, frozenset(labels.items()) if labels else None


def sources(objects, port: int) -> set:
    return {source(policy, peer) for policy, peer in peers_admitting(objects, port)}


def unpinned_sources(objects) -> list[str]:
    """Every peer admitting the dashboard, its agent or the metrics port from a namespace not pinned by name,
    or the dashboard or its agent from another namespace's pods without a pod selector."""
    bad = []
    for port in (*OPERATOR_PORTS, METRICS_PORT):
        for policy, peer in peers_admitting(objects, port):
            namespace, labels = source(policy, peer)
            elsewhere = namespace != policy["metadata"]["namespace"]
            if namespace is None or (port in OPERATOR_PORTS and elsewhere and labels is None):
                bad.append(f"{policy['metadata']['name']}: port {port} from {peer}")
    return bad


def test_no_policy_admits_the_dashboard_or_metrics_from_an_unpinned_namespace(objects):
    assert unpinned_sources(objects) == []
    # Besides the Ray pods themselves: the KubeRay operator's pods in its namespace, Prometheus' namespace.
    operator = {("ray-system", frozenset({("app.kubernetes.io/name", "kuberay-operator")}))}
    assert sources(objects, 8265) - SAME_NAMESPACE == sources(objects, 52365) - SAME_NAMESPACE == operator
    assert sources(objects, METRICS_PORT) - SAME_NAMESPACE == {("prometheus-system", None)}
    # The API port stays open to your ingress, wherever it runs.
    assert sources(objects, 8000) - SAME_NAMESPACE == {(None, None)}


@pytest.mark.parametrize("mutate", [
    # The policy as it was: any namespace.
    lambda rules: rules[2]["from"][0].update(namespaceSelector={}),
    lambda rules: rules[3]["from"][0].update(namespaceSelector={}),
    # A rule with no `from` admits every source; one with no ports admits every port.
    lambda rules: rules[3].pop("from"),
    lambda rules: rules.append({"from": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]}),
    # The namespace, pinned, but any of its pods may reach the dashboard.
    lambda rules: rules[3]["from"][0].pop("podSelector"),
    # Namespace and pod in two `from` elements: each admits on its own (the namespace's every pod).
    lambda rules: rules[3].update({"from": [{"namespaceSelector": rules[3]["from"][0]["namespaceSelector"]},
                                            {"podSelector": rules[3]["from"][0]["podSelector"]}]}),
    # The operator's pods, in any namespace.
    lambda rules: rules[3]["from"][0].update(namespaceSelector={"matchLabels": {"team": "platform"}}),
    lambda rules: rules.append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": "metrics"}]}),
    lambda rules: rules.append({"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": NAMESPACE_LABEL, "operator": "NotIn", "values": ["kube-system"]}]}}],
        "ports": [{"port": 8000, "endPort": 9000}]}),
])
def test_the_policy_check_catches_an_open_dashboard_or_metrics_port(objects, mutate):
    broken = copy.deepcopy(objects)
    (policy,) = [o for o in broken if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "llava-ray"]
    mutate(policy["spec"]["ingress"])
    assert unpinned_sources(broken)


# --- Redis: its password and its memory -----------------------------------------------------------------------


def redis_container(objects) -> dict:
    (sts,) = [o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "llava-redis"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    return c


def secret_refs(c: dict) -> dict[str, tuple[str, str]]:
    """Each environment variable a container takes from a Secret: (Secret, key)."""
    return {e["name"]: (ref["name"], ref["key"]) for e in c.get("env", [])
            if (ref := (e.get("valueFrom") or {}).get("secretKeyRef"))}


def test_redis_takes_its_password_from_the_secret_and_only_its_clients_share_it(objects, rayservice, prod):
    redis = redis_container(objects)
    refs = secret_refs(redis)
    assert refs["REDIS_PASSWORD"] == refs["REDISCLI_AUTH"]  # the server's and the readiness probe's
    name, key = refs["REDIS_PASSWORD"]
    # The base ships no password (an overlay supplies it, docs/kubernetes.md): nothing in clear in k8s/.
    assert base64.b64decode(secret(objects, name)["data"][key]) == b""
    script = redis["args"][-1]
    assert redis["command"] == ["sh", "-c"] and '--requirepass "$REDIS_PASSWORD"' in script
    assert '"$(redis-cli ping)" = PONG' in redis["readinessProbe"]["exec"]["command"][-1]  # NOAUTH is not ready
    # The store's clients get the same one, under the name the store reads: the ingress replicas, and the head,
    # where Serve's controller runs the engine's autoscaling policy, which reads the queue (docs/autoscaling.md).
    # The GPU workers never; the store's URL holds none.
    groups = ray_groups(rayservice)
    for group in ("cpu-ingress", "head"):
        assert secret_refs(container(groups[group]))[ENV_REDIS_PASSWORD] == (name, key)
    assert ENV_REDIS_PASSWORD not in secret_refs(container(groups["gpu-l40s"]))
    assert urlsplit(prod.store.redis_url).password is None
    # No manifest sets a password in clear.
    for o in objects:
        for e in (e for c in _containers(o) for e in c.get("env", [])):
            if e["name"] in ("REDIS_PASSWORD", "REDISCLI_AUTH", ENV_REDIS_PASSWORD):
                assert "value" not in e, (o["metadata"]["name"], e["name"])


def _containers(obj: dict) -> list[dict]:
    if obj["kind"] == "RayService":
        return [c for g in ray_groups(obj).values() for c in g["template"]["spec"]["containers"]]
    if obj["kind"] in ("StatefulSet", "Job"):
        return obj["spec"]["template"]["spec"]["containers"]
    return []


REDIS_UNITS = {"gb": 2**30}  # Redis' "gb" is 1024^3 bytes, like Kubernetes' "Gi"


def start_redis(container: dict, password: str, tmp_path) -> tuple[subprocess.CompletedProcess, list[str] | None]:
    """The Redis container's start script, run by the local sh with a redis-server that records its arguments."""
    bin_dir, argv = tmp_path / "bin", tmp_path / "argv"
    bin_dir.mkdir(exist_ok=True)
    argv.unlink(missing_ok=True)
    stub = bin_dir / "redis-server"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > "$ARGV_FILE"\n')
    stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "REDIS_PASSWORD": password, "ARGV_FILE": str(argv)}
    res = subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True,
                         timeout=30)
    return res, argv.read_text().split("\0")[:-1] if argv.exists() else None


@pytest.mark.parametrize("password", ["", "too-short-15-ch"])
def test_redis_never_starts_without_a_password(objects, tmp_path, password):
    res, argv = start_redis(redis_container(objects), password, tmp_path)
    assert res.returncode == 1 and argv is None
    assert "llava-redis-auth" in res.stderr and "docs/kubernetes.md" in res.stderr


def test_redis_starts_with_the_secrets_password_and_the_sized_memory(objects, tmp_path):
    password = "a-long $(random) \"password\" `with` 'quotes' & spaces"
    res, argv = start_redis(redis_container(objects), password, tmp_path)
    assert res.returncode == 0, res.stderr
    flags = dict(zip(argv[::2], argv[1::2]))
    assert len(argv) == 2 * len(flags)  # every flag with its value
    assert flags["--requirepass"] == password  # verbatim: no shell expansion, no splitting
    assert flags["--appendonly"] == "yes" and flags["--dir"] == "/data"
    # docs/bounds.md, "The job store" (sizing Redis): maxmemory 2gb, refusing writes when full (the store answers
    # 503), and the container's memory at twice that, for the append-only file's rewrite (a fork).
    assert flags["--maxmemory"] == "2gb" and flags["--maxmemory-policy"] == "noeviction"
    resources = redis_container(objects)["resources"]
    assert resources["limits"]["memory"] == resources["requests"]["memory"] == "4Gi"
    assert 4 * 2**30 == 2 * REDIS_UNITS["gb"] * int(flags["--maxmemory"].removesuffix("gb"))
    bounds = (ROOT / "docs/bounds.md").read_text()
    assert "`maxmemory 2gb`" in bounds and "(4 GiB)" in bounds
