"""The gateway reaches its inference service over mutual TLS.

Our inference service speaks plaintext, so a TLS-terminating TCP proxy (as a service mesh sidecar or an ingress
would be) sits in front of it: it requires a client certificate from the test CA, negotiates HTTP/2 (ALPN h2) and
pipes bytes to the real inference service. Nothing is answered by the proxy itself.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from cxr.generated.cxr.v1 import gateway_pb2 as pb
from cxr.generated.cxr.v1 import gateway_pb2_grpc
from tests.gateway import certs, processes


class TlsProxy:
    """TLS (client certificate required) on a loopback port, forwarding the plaintext bytes to `target_port`."""

    def __init__(self, target_port: int, pki: certs.Pki):
        self.target_port = target_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        self.context.load_verify_locations(pki.ca)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.set_alpn_protocols(["h2"])
        self.client_names: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context))
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        self.client_names.append(dict(x[0] for x in peer.get("subject", ())).get("commonName", ""))
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_gateway_to_inference_over_mutual_tls(inference_service, dicom_dir: Path, tmp_path: Path):
    pki = certs.make_pki(tmp_path / "pki")
    proxy = TlsProxy(inference_service.port, pki)
    upstream = f"127.0.0.1:{proxy.port}"
    good = processes.start_gateway(
        upstream,
        tmp_path / "good",
        extra=[
            "--upstream-ca",
            str(pki.ca),
            "--upstream-cert",
            str(pki.client_cert),
            "--upstream-key",
            str(pki.client_key),
        ],
    )
    no_cert = processes.start_gateway(upstream, tmp_path / "no-cert", extra=["--upstream-ca", str(pki.ca)])
    try:
        processes.wait_ready(good.address)
        channel = grpc.insecure_channel(good.address)
        response = gateway_pb2_grpc.GatewayStub(channel).Classify(
            pb.ClassifyRequest(image=(dicom_dir / "CR-MONO1-10-chest.dcm").read_bytes(), model_name="custom_cnn"),
            timeout=60,
        )
        channel.close()
        assert response.model_name == "custom_cnn" and response.model_sha256
        assert "pacs-integration" in proxy.client_names  # the gateway presented the client certificate
        # without a client certificate the TLS handshake fails: never ready, and requests get UNAVAILABLE
        assert processes.health_status(no_cert.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        channel = grpc.insecure_channel(no_cert.address)
        try:
            gateway_pb2_grpc.GatewayStub(channel).ListModels(pb.ListModelsRequest(), timeout=20)
            raise AssertionError("ListModels succeeded without a client certificate")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            channel.close()
    finally:
        good.stop()
        no_cert.stop()
        proxy.close()
