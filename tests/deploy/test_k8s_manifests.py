"""deploy/k8s: the kustomize base and overlay render with `kubectl kustomize` and validate against the Kubernetes
schemas offline (kubernetes-validate bundles them), and the objects agree with each other (selectors, ports, probes).
"""

from __future__ import annotations

import copy
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, require

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31.0"  # the oldest release we support: gRPC probes, autoscaling/v2, policy/v1 PDBs
VARIANTS = ["base", "overlays/production"]


def render(variant: str) -> list[dict]:
    require(shutil.which("kubectl") is not None, "kubectl not installed: needed for `kubectl kustomize`")
    done = subprocess.run(["kubectl", "kustomize", str(K8S / variant)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {variant} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module", params=VARIANTS)
def objects(request) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in render(request.param)}


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_every_object_validates_against_the_kubernetes_schemas(objects):
    for (kind, _name), obj in objects.items():
        if kind == "ServiceMonitor":
            continue  # a Prometheus Operator CRD, not in the Kubernetes schemas: checked in its own test
        validate(obj)


def test_the_validator_rejects_a_broken_manifest(objects):
    """The schema check is real: a misspelt field or a wrong type fails it."""
    broken = copy.deepcopy(objects[("Deployment", "inference")])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 8001}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    broken = copy.deepcopy(objects[("HorizontalPodAutoscaler", "gateway")])
    broken["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def pod_spec(objects, name: str) -> dict:
    return objects[("Deployment", name)]["spec"]["template"]["spec"]


def test_inference_service_is_headless_and_the_gateway_balances_per_call(objects):
    service = objects[("Service", "inference")]
    assert service["spec"]["clusterIP"] == "None"
    [gateway] = pod_spec(objects, "gateway")["containers"]
    args = gateway["args"]
    assert args[args.index("--inference") + 1] == "dns:///inference:8001"
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert env["CXR_GATEWAY_LB_POLICY"] == "round_robin"


@pytest.mark.parametrize("name,port", [("inference", 8001), ("gateway", 50051)])
def test_grpc_probes_and_ports(objects, name, port):
    [container] = pod_spec(objects, name)["containers"]
    assert container["readinessProbe"]["grpc"]["port"] == port, f"{name} readiness must ask the gRPC health service"
    if name == "inference":
        assert container["livenessProbe"]["grpc"]["port"] == port
        assert container["startupProbe"]["grpc"]["port"] == port, "model loading needs time before liveness counts"
    else:  # the gateway's health follows its upstream: liveness must not restart gateways while inference is down
        assert container["livenessProbe"]["tcpSocket"]["port"] == port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == port and "metrics" in ports
    args = container["args"]
    assert int(args[args.index("--port") + 1]) == port
    assert int(args[args.index("--metrics-port") + 1]) == ports["metrics"]


@pytest.mark.parametrize("name", ["inference", "gateway"])
def test_pods_run_non_root_with_resources(objects, name):
    spec = pod_spec(objects, name)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in spec["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]) <= set(container["resources"]["limits"])


def test_selectors_match_their_pods(objects):
    for name in ("inference", "gateway"):
        labels = objects[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        for kind in ("Service", "PodDisruptionBudget"):
            obj = objects[(kind, name)]
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert selector.items() <= labels.items(), f"{kind} {name} selects no pod of its Deployment"
    hpa = objects[("HorizontalPodAutoscaler", "gateway")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    for name in ("inference", "gateway"):
        pdb = objects[("PodDisruptionBudget", name)]
        replicas = objects[("Deployment", name)]["spec"]["replicas"]
        assert pdb["spec"]["minAvailable"] < replicas, f"PDB {name} would block every voluntary eviction"


def test_servicemonitor_scrapes_both_services(objects):
    monitor = objects[("ServiceMonitor", "cxr")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    [expression] = monitor["spec"]["selector"]["matchExpressions"]
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    scraped = set()
    for (kind, name), obj in objects.items():
        if kind != "Service":
            continue
        value = obj["metadata"]["labels"].get(expression["key"])
        if expression["operator"] == "In" and value in expression["values"]:
            scraped.add(name)
            assert endpoint_ports <= {p["name"] for p in obj["spec"]["ports"]}, f"Service {name} lacks a metrics port"
    assert scraped == {"inference", "gateway"}


def test_production_overlay_puts_inference_on_gpus():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render("overlays/production")}
    assert all(o["metadata"].get("namespace") == "cxr" for (kind, _), o in objects.items() if kind != "Namespace")
    [container] = pod_spec(objects, "inference")["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":0.1.0")
    base = {(o["kind"], o["metadata"]["name"]): o for o in render("base")}
    [base_container] = pod_spec(base, "inference")["containers"]
    assert "nvidia.com/gpu" not in base_container["resources"]["limits"], "the base runs on CPU-only clusters"


@pytest.mark.parametrize("name", ["inference", "gateway"])
def test_environment_names_settings_the_service_has(objects, name):
    """Settings ignore unknown CXR_* variables, so a misspelt one would silently do nothing: check each name."""
    from services.gateway.config import GatewaySettings
    from services.inference.config import InferenceSettings

    settings = {"inference": InferenceSettings, "gateway": GatewaySettings}[name]
    prefix = settings.model_config["env_prefix"]
    [container] = pod_spec(objects, name)["containers"]
    names = [e["name"] for e in container.get("env", []) if e["name"].startswith("CXR_")]
    assert names
    for env in names:
        assert env.startswith(prefix) and env[len(prefix) :].lower() in settings.model_fields, f"{env}: no such setting"
    values = {
        e["name"][len(prefix) :].lower(): e["value"]
        for e in container["env"]
        if e["name"].startswith(prefix) and "value" in e
    }  # (secrets come by valueFrom)
    settings(**values)  # and the values have the right types


def test_only_gateways_and_prometheus_reach_inference(objects):
    policy = objects[("NetworkPolicy", "inference")]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "inference"}
    assert policy["policyTypes"] == ["Ingress"]
    rules = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(rules) == {"grpc", "metrics"} and all(len(rule["ports"]) == 1 for rule in policy["ingress"])
    assert rules["grpc"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}]
    [prometheus] = rules["metrics"]
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    ports = {p["name"] for p in pod_spec(objects, "inference")["containers"][0]["ports"]}
    assert {"grpc", "metrics"} <= ports, "the policy's named ports exist on the inference pods"


def test_gateways_send_the_token_inference_requires(objects):
    def secret(name: str, env: str) -> dict:
        [container] = pod_spec(objects, name)["containers"]
        [entry] = [e for e in container["env"] if e["name"] == env]
        return entry["valueFrom"]["secretKeyRef"]

    assert secret("inference", "CXR_INFERENCE_AUTH_TOKENS") == secret("gateway", "CXR_GATEWAY_UPSTREAM_TOKEN")


@pytest.mark.parametrize("name,prefix", [("inference", "CXR_INFERENCE_"), ("gateway", "CXR_GATEWAY_")])
def test_drain_delay_and_grace_fit_in_the_termination_grace_period(objects, name, prefix):
    spec = pod_spec(objects, name)
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    delay = float(env[f"{prefix}DRAIN_DELAY_S"])
    grace = float(env[f"{prefix}GRACE_PERIOD_S" if name == "inference" else f"{prefix}SHUTDOWN_GRACE_S"])
    assert delay > 0 and delay + grace < spec["terminationGracePeriodSeconds"]
