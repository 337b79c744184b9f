"""The compose stack, for real: build the images, bring up inference + gateway + Prometheus with a model repository
that our own training exported, classify a real radiograph through the gateway's published port with
`cxr classify`, read the request counter back from Prometheus's HTTP API, and take the stack down.

Needs a Docker engine and docker-compose: `eval "$(../shared/tools/docker-local.sh)"` starts one here and builds
local stand-ins for the registry base images (BASE_IMAGE, PROMETHEUS_IMAGE). Without an engine these tests
skip, and under CI=true they fail. Grafana, the gpu and the triton profiles cannot run here: see
test_compose_config.py and test_grafana_dashboard.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from promql_check import DASHBOARD, expressions, metric_references, substitute

from conftest import ROOT, require

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SERVICES = ["inference", "gateway", "prometheus"]  # Grafana is not among Debian's packages: no stand-in image


@dataclass
class Stack:
    compose: list[str]
    env: dict[str, str]
    repository: Path
    gateway: str
    prometheus: str
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*self.compose, *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert done.returncode == 0, f"docker-compose {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service).stdout.strip()

    def image(self, service: str) -> str:
        return f"cxr/{service}:{self.env['CXR_IMAGE_TAG']}"


def docker(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(stack: Stack, service: str) -> str:
    done = docker("inspect", "--format", "{{.State.Health.Status}}", stack.container(service), env=stack.env)
    return done.stdout.strip()


def prometheus_query(stack: Stack, query: str) -> list[dict]:
    reply = requests.get(f"{stack.prometheus}/api/v1/query", params={"query": query}, timeout=10)
    reply.raise_for_status()
    return reply.json()["data"]["result"]


def wait_for(condition, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def classify(stack: Stack, image: Path, model: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cxr", "classify", str(image), "--server", stack.gateway, "--model", model, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Session-scoped so that it runs before `trained_repository` (minutes of training) when there is no engine."""
    require(
        shutil.which("docker") is not None and shutil.which("docker-compose") is not None,
        "docker and docker-compose are not installed (see ../shared/tools/docker-local.sh)",
    )
    require(
        docker("info", timeout=30).returncode == 0,
        'no Docker engine reachable: run `eval "$(../shared/tools/docker-local.sh)"` first',
    )


@pytest.fixture(scope="module")
def stack(docker_engine: None, trained_repository: Path, tmp_path_factory) -> Stack:

    # The servers mount the repository read-only as uid 10001: a world-readable copy of our exported models.
    repository = tmp_path_factory.mktemp("compose") / "model_repository"
    shutil.copytree(trained_repository, repository)
    for path in [repository, *repository.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)

    gateway_port, prometheus_port = free_port(), free_port()
    env = {
        **os.environ,
        "CXR_MODEL_REPOSITORY": str(repository),
        "CXR_BIND_ADDRESS": "127.0.0.1",
        "CXR_GATEWAY_PORT": str(gateway_port),
        "PROMETHEUS_PORT": str(prometheus_port),
        "CXR_IMAGE_TAG": "test",
        "ORTHANC_HTTP_PORT": str(free_port()),
        "ORTHANC_DICOM_PORT": str(free_port()),
    }
    project = f"cxrtest{os.getpid()}"
    stack = Stack(
        compose=["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "-p", project],
        env=env,
        repository=repository,
        gateway=f"127.0.0.1:{gateway_port}",
        prometheus=f"http://127.0.0.1:{prometheus_port}",
    )
    try:
        start = time.monotonic()
        stack.run("build", "inference", "gateway", timeout=1500)
        stack.timings["build_s"] = time.monotonic() - start

        start = time.monotonic()
        stack.run("up", "-d", *SERVICES, timeout=300)  # the gateway starts once inference is healthy
        wait_for(lambda: health(stack, "gateway") == "healthy", 120, "the gateway's health check")
        wait_for(
            lambda: (
                requests.get(f"{stack.prometheus}/-/ready", timeout=5).ok if _reachable(stack.prometheus) else False
            ),
            60,
            "Prometheus to be ready",
        )
        stack.timings["up_to_healthy_s"] = time.monotonic() - start
        print(
            f"\ncompose stack: build {stack.timings['build_s']:.1f} s, "
            f"up to healthy {stack.timings['up_to_healthy_s']:.1f} s"
        )
        yield stack
    finally:
        if sys.exc_info()[0] is not None or os.environ.get("CXR_COMPOSE_LOGS"):
            print(stack.run("logs", "--no-color", "--tail", "60", check=False).stdout)
        stack.run("down", "-v", "--remove-orphans", "-t", "10", check=False, timeout=180)
        assert not stack.run("ps", "-q", check=False).stdout.strip(), "containers left after `docker-compose down`"


def _reachable(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
        return True
    except requests.ConnectionError:
        return False


def served_model(repository: Path) -> str:
    """The gateway's default model when the repository has it, else the first one."""
    models = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    assert models, f"no model in {repository}"
    return "ensemble" if "ensemble" in models else models[0]


def test_classify_a_radiograph_through_the_gateway_and_count_it_in_prometheus(stack: Stack, cxr_raw_dir: Path):
    model = served_model(stack.repository)
    radiograph = sorted((cxr_raw_dir / "Normal").glob("*.png"))[0]
    done = classify(stack, radiograph, model)
    assert done.returncode == 0, done.stderr
    [answer] = json.loads(done.stdout)

    labels = (stack.repository / model / "labels.txt").read_text().split("\n")
    assert [c["label"] for c in answer["classes"]] == [label for label in labels if label]
    probabilities = [c["probability"] for c in answer["classes"]]
    assert (
        abs(sum(probabilities) - 1) < 1e-3
        and answer["top_class"] == answer["classes"][probabilities.index(max(probabilities))]["label"]
    )
    assert answer["model_name"] == model
    card = json.loads((stack.repository / model / answer["model_version"] / "model_card.json").read_text())
    assert answer["model_sha256"] == card["sha256"], "the container served a different file than the repository holds"
    assert any("not for clinical use" in notice.lower() for notice in answer["notices"])

    # A file that is no image: a clear INVALID_ARGUMENT, and the stack stays up.
    bogus = stack.repository.parent / "not-an-image.png"
    bogus.write_bytes(b"this is not an image")
    done = classify(stack, bogus, model)
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr

    def counted():
        result = prometheus_query(stack, "sum by (code) (cxr_gateway_requests_total)")
        counts = {r["metric"].get("code"): float(r["value"][1]) for r in result}
        served = prometheus_query(stack, f'sum(cxr_inference_request_success_total{{model="{model}"}})')
        # wait for a scrape that saw both requests: one scrape may fall between them
        if (
            counts.get("OK", 0) >= 1
            and counts.get("INVALID_ARGUMENT", 0) >= 1
            and served
            and float(served[0]["value"][1]) >= 1
        ):
            return counts
        return None

    counts = wait_for(counted, 60, "Prometheus to scrape the request counters", interval=2)
    assert counts == {"OK": 1, "INVALID_ARGUMENT": 1}, (
        f"one OK and one refused request expected, Prometheus has {counts}"
    )
    assert stack.run("ps").stdout.count("Up") == len(SERVICES)


def test_prometheus_scrapes_both_services_loads_the_alerts_and_has_every_dashboard_metric(stack: Stack):
    up = {r["metric"]["instance"]: r["value"][1] for r in prometheus_query(stack, 'up{job=~"cxr-.*"}')}
    assert up["gateway:9090"] == "1" and up["inference:8002"] == "1", up

    rules = requests.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {rule["name"] for group in rules for rule in group["rules"]}
    assert {"CxrTargetDown", "CxrGatewayUpstreamNotReady", "CxrHighErrorRatio"} <= loaded, loaded

    # Metric families as the running services expose them (HELP/TYPE lines, even before a first sample).
    metadata = requests.get(f"{stack.prometheus}/api/v1/metadata", timeout=10).json()["data"]
    families = set(metadata) | {"up"}
    for expr in expressions(json.loads(DASHBOARD.read_text())):
        metrics, _ = metric_references(substitute(expr))
        for name in metrics:
            family = name.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            assert family in families, f"dashboard metric {name} is not exported by the running services"


def test_images_run_non_root_without_torch(stack: Stack):
    sizes = {}
    for service, has_onnxruntime in (("inference", True), ("gateway", False)):
        image = stack.image(service)
        inspect = json.loads(docker("image", "inspect", image, env=stack.env).stdout)[0]
        assert inspect["Config"]["User"] == "10001:10001", f"{image} runs as {inspect['Config']['User']!r}"
        assert inspect["Config"]["Healthcheck"]["Test"][-1].count("grpc_health_check.py") == 1
        assert "not for clinical use" in inspect["Config"]["Labels"]["org.opencontainers.image.description"]
        sizes[service] = inspect["Size"]
        probe = (
            "import importlib.util as u; "
            "print(u.find_spec('torch') is None, u.find_spec('training') is None, u.find_spec('onnxruntime') is not None)"
        )
        done = docker("run", "--rm", "--entrypoint", "python", image, "-c", probe, env=stack.env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["True", "True", str(has_onnxruntime)], f"{image}: {done.stdout}"
    # On a base without CUDA (the local stand-in), the inference image has onnxruntime's CPU build, and only it
    builds = "import importlib.metadata as m; print(sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith('onnxruntime')))"
    done = docker("run", "--rm", "--entrypoint", "python", stack.image("inference"), "-c", builds, env=stack.env)
    assert done.returncode == 0 and done.stdout.strip() == "['onnxruntime']", done.stdout + done.stderr
    print("\nimage sizes: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sizes.items()))


def test_pacs_profile_orthanc_routes_a_radiograph_to_the_node_and_gets_sr_and_sc_back(stack: Stack, dicom_dir: Path):
    """`--profile pacs`: the staging Orthanc (Debian's packages, our image) routes a stored CR/DX instance to the
    DICOM node, which classifies it through the gateway and stores an SR and a Secondary Capture in its study."""
    import io

    import pydicom

    pacs = ["--profile", "pacs"]
    try:
        start = time.monotonic()
        stack.run(*pacs, "build", "dicom", "orthanc", timeout=1500)
        stack.run(*pacs, "up", "-d", "dicom", "orthanc", timeout=300)
        wait_for(
            lambda: health(stack, "dicom") == "healthy" and health(stack, "orthanc") == "healthy",
            120,
            "the node's C-ECHO and Orthanc's health checks",
        )
        print(f"\npacs profile: build + up to healthy {time.monotonic() - start:.1f} s")
        orthanc = f"http://127.0.0.1:{stack.env['ORTHANC_HTTP_PORT']}"
        path = next(dicom_dir.glob("nih_*.dcm"))
        upload = requests.post(f"{orthanc}/instances", data=path.read_bytes(), timeout=60)
        upload.raise_for_status()
        study = upload.json()["ParentStudy"]

        def results():
            series = requests.get(f"{orthanc}/studies/{study}/series", timeout=10).json()
            found = {s["MainDicomTags"].get("Modality"): s["Instances"] for s in series}
            return found if found.get("SR") and found.get("OT") else None

        found = wait_for(results, 120, "the SR and SC in the study", interval=1)
        sr = pydicom.dcmread(io.BytesIO(requests.get(f"{orthanc}/instances/{found['SR'][0]}/file", timeout=10).content))
        source = pydicom.dcmread(path, stop_before_pixels=True)
        assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.VerificationFlag == "UNVERIFIED"
        inspect = json.loads(docker("image", "inspect", stack.image("dicom"), env=stack.env).stdout)[0]
        assert inspect["Config"]["User"] == "10001:10001"
    finally:
        if sys.exc_info()[0] is not None:
            print(stack.run(*pacs, "logs", "--no-color", "--tail", "60", "dicom", "orthanc", check=False).stdout)
        stack.run(*pacs, "rm", "-s", "-f", "-v", "dicom", "orthanc", check=False, timeout=180)
