"""Container health check: ask a server's grpc.health.v1 service whether it is SERVING.

    python grpc_health_check.py HOST:PORT [SERVICE]

Exit 0 when SERVING, 1 otherwise (the Docker HEALTHCHECK convention). Uses only grpcio and
grpcio-health-checking, which every image has: no probe binary is downloaded at build time.
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: grpc_health_check.py HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    service = argv[2] if len(argv) == 3 else ""
    with grpc.insecure_channel(argv[1]) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
        except grpc.RpcError as err:
            print(f"{argv[1]}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{argv[1]}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
