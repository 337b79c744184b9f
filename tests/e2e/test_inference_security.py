"""Who may talk to the inference service: mutual TLS and bearer tokens on the real process, the gateway reaching it
with its upstream TLS options and token, and model names that never reach the filesystem unchecked."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cxr.generated.cxr.v1 import gateway_pb2 as gpb
from cxr.generated.cxr.v1 import gateway_pb2_grpc
from cxr.generated.inference import grpc_service_pb2 as pb
from cxr.generated.inference import grpc_service_pb2_grpc as pb_grpc
from services.common.security import channel_credentials
from services.inference.config import InferenceSettings
from tests.gateway import certs, processes

MODEL = "custom_cnn"
TOKEN = "inference-token-for-the-gateways"
UNLOAD = "/inference.GRPCInferenceService/RepositoryModelUnload"


def _start(repository: Path, workdir: Path, extra: list[str], credentials=None) -> processes.Service:
    service = processes.start(
        "inference",
        [
            "--repository",
            str(repository),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            "--intra-op-threads",
            "1",
            "--model-control",
            "explicit",
            "--load-model",
            MODEL,
            *extra,
        ],
        workdir,
        env={"CXR_INFERENCE_AUTH_TOKENS": TOKEN},
    )
    processes.wait_ready(service.address, credentials=credentials)
    return service


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, timeout=10, **kwargs)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def _counter(metrics: str, name: str, method: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f'{name}{{method="{method}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_loopback_is_the_default_bind():
    assert InferenceSettings().host == "127.0.0.1"


def test_mutual_tls_and_tokens_on_every_rpc_but_health(trained_repository: Path, dicom_dir: Path, tmp_path: Path):
    pki = certs.make_pki(tmp_path / "pki")
    client = channel_credentials(pki.ca, pki.client_cert, pki.client_key)
    inference = _start(
        trained_repository,
        tmp_path / "inference",
        ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)],
        credentials=client,
    )
    gateway = None
    try:
        address = f"localhost:{inference.port}"
        # no client certificate: the TLS handshake itself fails
        with grpc.secure_channel(address, channel_credentials(pki.ca)) as channel:
            assert (
                _code(pb_grpc.GRPCInferenceServiceStub(channel).ServerLive, pb.ServerLiveRequest())
                == grpc.StatusCode.UNAVAILABLE
            )
        with grpc.secure_channel(address, client) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            # health needs no token: probes and the gateways' readiness checks
            assert (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            # the unload that took a model offline unauthenticated: refused without a token or with a wrong one
            unload = pb.RepositoryModelUnloadRequest(model_name=MODEL)
            assert _code(stub.RepositoryModelUnload, unload) == grpc.StatusCode.UNAUTHENTICATED
            assert (
                _code(stub.RepositoryModelUnload, unload, metadata=[("authorization", "Bearer not-the-token")])
                == grpc.StatusCode.UNAUTHENTICATED
            )
            assert stub.ModelReady(
                pb.ModelReadyRequest(name=MODEL), timeout=10, metadata=[("authorization", f"Bearer {TOKEN}")]
            ).ready
            assert _code(stub.ModelMetadata, pb.ModelMetadataRequest(name=MODEL)) == grpc.StatusCode.UNAUTHENTICATED
        log = inference.log_text()
        refusals = [line for line in log.splitlines() if "authentication refused" in line]
        assert len(refusals) == 3 and all('"peer":' in line and '"method":' in line for line in refusals)
        assert TOKEN not in log and "not-the-token" not in log
        assert _counter(inference.metrics_text(), "cxr_inference_auth_refused_total", UNLOAD) == 2

        # the gateway reaches it by host name (the certificate's), with its client certificate and the token
        gateway = processes.start_gateway(
            address,
            tmp_path / "gateway",
            env={"CXR_GATEWAY_UPSTREAM_TOKEN": TOKEN},
            extra=[
                "--upstream-ca",
                str(pki.ca),
                "--upstream-cert",
                str(pki.client_cert),
                "--upstream-key",
                str(pki.client_key),
            ],
        )
        processes.wait_ready(gateway.address)
        with grpc.insecure_channel(gateway.address) as channel:
            image = (dicom_dir / "CR-MONO1-10-chest.dcm").read_bytes()
            answer = gateway_pb2_grpc.GatewayStub(channel).Classify(
                gpb.ClassifyRequest(image=image, model_name=MODEL), timeout=60
            )
        assert answer.model_name == MODEL
    finally:
        if gateway is not None:
            gateway.kill()
        inference.kill()


def test_control_scope_and_model_names_never_reach_the_filesystem(trained_repository: Path, tmp_path: Path):
    import shutil

    repository = tmp_path / "repository"
    shutil.copytree(trained_repository / MODEL, repository / MODEL)
    shutil.copytree(trained_repository / MODEL, repository / "broken")  # its config.pbtxt names another model
    inference = _start(repository, tmp_path / "inference", ["--auth-scope", "control"])
    server_path = str(repository.resolve())
    try:
        with grpc.insecure_channel(inference.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            # scope "control": reading and inference need no token, changing what is served does
            assert _code(stub.ModelMetadata, pb.ModelMetadataRequest(name=MODEL)) == grpc.StatusCode.OK
            assert (
                _code(stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=MODEL))
                == grpc.StatusCode.UNAUTHENTICATED
            )
            token = [("authorization", f"Bearer {TOKEN}")]
            for name in ("x" * 300, "é" * 200, "../" + MODEL, "a\x00b", ".hidden"):
                for call, request in (
                    (stub.ModelMetadata, pb.ModelMetadataRequest(name=name)),
                    (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name)),
                    (stub.ModelInfer, pb.ModelInferRequest(model_name=name)),
                ):
                    with pytest.raises(grpc.RpcError) as info:
                        call(request, timeout=10, metadata=token)
                    assert info.value.code() == grpc.StatusCode.NOT_FOUND, (
                        name[:10],
                        info.value.code(),
                        info.value.details(),
                    )
                    assert server_path not in info.value.details() and len(info.value.details()) < 1000
                assert not stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10).ready
            # a broken model's load error and index reason name no server path either
            with pytest.raises(grpc.RpcError) as info:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"), timeout=30, metadata=token)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "broken" in info.value.details()
            assert server_path not in info.value.details()
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
            reasons = [m.reason for m in index.models if m.name == "broken"]
            assert reasons and all(server_path not in r for r in reasons)
        # the REST port applies the same rules to the RPC each route maps to
        import requests

        http = f"http://127.0.0.1:{inference.http_port}"
        assert requests.get(f"{http}/v2/health/ready", timeout=10).status_code == 200  # health: no token
        assert requests.get(f"{http}/v2/models/{MODEL}", timeout=10).status_code == 200  # scope control: reads are open
        refused = requests.post(f"{http}/v2/repository/models/{MODEL}/unload", timeout=10)
        assert refused.status_code == 401 and "bearer token" in refused.json()["error"]
        wrong = requests.post(
            f"{http}/v2/repository/models/{MODEL}/unload", timeout=10, headers={"Authorization": "Bearer not-the-token"}
        )
        assert wrong.status_code == 401
        assert _counter(inference.metrics_text(), "cxr_inference_auth_refused_total", UNLOAD) == 3  # 1 gRPC + 2 HTTP
        unloaded = requests.post(
            f"{http}/v2/repository/models/{MODEL}/unload", timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert unloaded.status_code == 200, unloaded.text
        assert requests.get(f"{http}/v2/models/{MODEL}/ready", timeout=10).status_code == 400  # unloaded: not ready
        assert inference.alive()
        assert "Traceback" not in inference.log_text() and TOKEN not in inference.log_text()
    finally:
        inference.kill()
