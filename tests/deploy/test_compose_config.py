"""docker-compose.yml, checked offline with `docker-compose config` (the real Compose parser; no engine needed).

Every profile is validated here, including the ones that cannot run on this machine (gpu: no GPU; triton: no
registry). The real stack comes up in test_compose_stack.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, require

COMPOSE_FILE = ROOT / "docker-compose.yml"
PROFILES = ["trainer", "gpu", "triton", "pacs"]


def compose_config(*profiles: str, env: dict[str, str] | None = None) -> dict:
    """The resolved compose model that `docker-compose config` prints (variables substituted, anchors merged)."""
    require(shutil.which("docker-compose") is not None, "docker-compose not installed (apt-get install docker-compose)")
    full_env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_IMAGE", "GRAFANA_IMAGE", "TRITON_IMAGE")}
    full_env.update(env or {})
    args = ["docker-compose", "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        args += ["--profile", profile]
    done = subprocess.run([*args, "config"], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=60)
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


def volumes(service: dict) -> dict[str, dict]:
    """target -> {source, read_only} of a service's mounts; Compose 1.29 prints the short form, v2 the long one."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            volume = {"source": source, "target": target, "read_only": mode == ["ro"]}
        found[volume["target"]] = {"source": volume["source"], "read_only": bool(volume.get("read_only"))}
    return found


@pytest.fixture(scope="module")
def services() -> dict:
    return compose_config(*PROFILES)["services"]


def test_file_keeps_to_keys_compose_1_29_accepts():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "name" not in raw, "top-level `name:` is rejected by docker-compose 1.29"
    assert "version" not in raw, "the Compose specification needs no `version:`"

    def walk(node, path=""):
        if isinstance(node, dict):
            for key, value in node.items():
                assert key != "gpus", f"{path}/gpus: use deploy.resources.reservations.devices instead"
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    walk(raw)


@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_each_profile_validates(profile):
    config = compose_config(*([profile] if profile else []))
    assert {"inference", "gateway", "prometheus", "grafana"} <= set(config["services"])


def test_default_stack_and_profiles(services):
    unprofiled = {name for name, svc in services.items() if not svc.get("profiles")}
    assert unprofiled == {"inference", "gateway", "prometheus", "grafana"}
    assert services["trainer"]["profiles"] == ["trainer"]
    assert {n for n, s in services.items() if s.get("profiles") == ["gpu"]} == {"inference-gpu", "gateway-gpu"}
    assert {n for n, s in services.items() if s.get("profiles") == ["triton"]} == {"triton", "gateway-triton"}
    assert {n for n, s in services.items() if s.get("profiles") == ["pacs"]} == {"dicom", "orthanc"}


@pytest.mark.parametrize(
    "gateway,upstream", [("gateway", "inference"), ("gateway-gpu", "inference-gpu"), ("gateway-triton", "triton")]
)
def test_gateway_waits_for_a_healthy_upstream_and_points_at_it(services, gateway, upstream):
    svc = services[gateway]
    assert svc["depends_on"] == {upstream: {"condition": "service_healthy"}}
    command = svc["command"]
    assert command[command.index("--inference") + 1] == f"{upstream}:8001"
    # the same gateway image in every profile: Triton replaces only the inference tier
    assert svc["image"] == services["gateway"]["image"]
    assert svc["build"]["dockerfile"] == "deploy/docker/gateway.Dockerfile"
    assert upstream == "triton" or services[upstream]["build"]["dockerfile"] == "deploy/docker/inference.Dockerfile"


def test_triton_has_its_own_healthcheck(services):
    # our images carry a HEALTHCHECK (gRPC health service); Triton's image has none, so compose adds one
    assert "/v2/health/ready" in " ".join(services["triton"]["healthcheck"]["test"])


def test_gpu_profile_reserves_a_gpu(services):
    devices = services["inference-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["inference"], "the default stack must run without a GPU"


def test_one_model_repository_for_inference_triton_and_trainer(services):
    served = [volumes(services[s])["/models"] for s in ("inference", "inference-gpu", "triton")]
    assert len({v["source"] for v in served}) == 1, "Triton must serve the very folder our inference serves"
    assert all(v["read_only"] for v in served), "servers mount the repository read-only"
    written = volumes(services["trainer"])["/models"]
    assert written["source"] == served[0]["source"] and not written["read_only"]


def test_registry_images_are_variables():
    defaults = compose_config()["services"]
    assert defaults["prometheus"]["image"].startswith("prom/prometheus:v")
    assert defaults["grafana"]["image"].startswith("grafana/grafana:")
    assert defaults["triton"]["image"].startswith("nvcr.io/nvidia/tritonserver:")
    pinned = compose_config(
        env={
            "PROMETHEUS_IMAGE": "mirror.example/prometheus:1",
            "GRAFANA_IMAGE": "mirror.example/grafana:2",
            "TRITON_IMAGE": "mirror.example/triton:3",
        }
    )["services"]
    assert (pinned["prometheus"]["image"], pinned["grafana"]["image"], pinned["triton"]["image"]) == (
        "mirror.example/prometheus:1",
        "mirror.example/grafana:2",
        "mirror.example/triton:3",
    )


def test_services_are_hardened(services):
    for name in ("inference", "gateway", "inference-gpu", "gateway-gpu", "gateway-triton", "dicom"):
        svc = services[name]
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name


def test_prometheus_scrapes_the_metrics_port_of_every_cxr_service(services):
    prometheus_yml = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    assert Path(volumes(services["prometheus"])["/etc/prometheus/prometheus.yml"]["source"]) == prometheus_yml
    scrape = yaml.safe_load(prometheus_yml.read_text())["scrape_configs"]
    targets = {t for job in scrape for group in job["static_configs"] for t in group["targets"]}
    for name, svc in services.items():
        command = svc.get("command") or []
        if command[:2] in (["serve", "gateway"], ["serve", "inference"], ["serve", "dicom"]):
            port = command[command.index("--metrics-port") + 1]
            assert f"{name}:{port}" in targets, f"Prometheus does not scrape {name}'s metrics port {port}"
            assert port in [str(p) for p in svc["expose"]], f"{name} does not expose its metrics port {port}"
    assert "triton:8002" in targets


def test_grafana_is_provisioned_from_the_repository(services):
    mounts = volumes(services["grafana"])
    provisioning = Path(mounts["/etc/grafana/provisioning"]["source"])
    dashboards_dir = Path(mounts["/var/lib/grafana/dashboards"]["source"])
    provider = yaml.safe_load((provisioning / "dashboards" / "cxr.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert list(dashboards_dir.glob("*.json")), "no dashboard JSON to provision"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services


def test_trainer_command_uses_flags_our_cli_accepts(services):
    """The trainer profile's shell command parses with `cxr`'s own argument parsers (train, evaluate, then export)."""
    import shlex

    from cxr.cli import SUBCOMMANDS, build_parser

    [script] = services["trainer"]["command"]
    steps = [shlex.split(step) for step in script.split("&&")]
    assert [step[:2] for step in steps] == [["cxr", "train"], ["cxr", "evaluate"], ["cxr", "export"], ["cxr", "export"]]
    for step in steps:
        module = SUBCOMMANDS[step[1]][0]
        args = build_parser(load=module).parse_args(step[1:])  # exits (SystemExit) on an unknown flag
        assert args.command == step[1]
    train = build_parser(load=SUBCOMMANDS["train"][0]).parse_args(steps[0][1:])
    assert (train.data, train.arch) == ("/data", "all")
    export = build_parser(load=SUBCOMMANDS["export"][0]).parse_args(steps[3][1:])
    assert export.ensemble and export.repository in ("/models", Path("/models"))
    assert volumes(services["trainer"])["/data"]["read_only"]


def test_environment_names_settings_the_service_has(services):
    """Settings ignore unknown CXR_* variables, so a misspelt one would silently do nothing: check each name."""
    from services.dicom.config import DicomSettings
    from services.gateway.config import GatewaySettings
    from services.inference.config import InferenceSettings

    checked = 0
    for name, svc in services.items():
        for env, value in (svc.get("environment") or {}).items():
            if not env.startswith("CXR_"):
                continue
            settings = next(
                s
                for s in (InferenceSettings, GatewaySettings, DicomSettings)
                if env.startswith(s.model_config["env_prefix"])
            )
            prefix = settings.model_config["env_prefix"]
            assert env.startswith(prefix) and env[len(prefix) :].lower() in settings.model_fields, f"{name}: {env}"
            settings(**{env[len(prefix) :].lower(): value})
            checked += 1
    assert checked >= 3


def test_pacs_profile_the_node_and_orthanc_know_each_other(services):
    """The node sends to Orthanc's AE title and DICOM port; Orthanc knows the node as modality "cxr" and routes
    radiographs to it; the node's command parses with our own CLI and keeps its spool on a volume."""
    import json

    from cxr.cli import SUBCOMMANDS, build_parser
    from services.dicom.config import Destination

    node, pacs = services["dicom"], services["orthanc"]
    args = build_parser(load=SUBCOMMANDS["serve"][0]).parse_args(node["command"])
    assert (args.service, args.gateway) == ("dicom", "gateway:50051")
    assert node["depends_on"] == {"gateway": {"condition": "service_healthy"}}
    assert volumes(node)["/spool"]["source"] and not volumes(node)["/spool"]["read_only"]
    assert node["environment"]["CXR_DICOM_SPOOL"] == "/spool"

    config = json.loads((ROOT / "deploy" / "orthanc" / "orthanc.json").read_text())
    [destination] = [Destination.parse(d) for d in args.destinations]
    assert (destination.ae_title, destination.host, destination.port) == (
        config["DicomAet"],
        "orthanc",
        config["DicomPort"],
    )
    modality = config["DicomModalities"]["cxr"]
    assert (modality["AET"], modality["Host"], modality["Port"]) == (
        node["environment"]["CXR_DICOM_AE_TITLE"],
        "dicom",
        args.port,
    )
    assert node["environment"]["CXR_DICOM_ALLOW_AE"] == config["DicomAet"]
    assert any(p.endswith("libOrthancDicomWeb.so") for p in config["Plugins"]) and config["DicomWeb"]["Enable"]
    script = (ROOT / "deploy" / "orthanc" / Path(config["LuaScripts"][0]).name).read_text()
    assert 'SendToModality(instanceId, "cxr")' in script
    # Orthanc has no authentication here: its published ports stay on loopback by default
    assert all(str(p.get("host_ip", p) if isinstance(p, dict) else p).startswith("127.0.0.1") for p in pacs["ports"])
