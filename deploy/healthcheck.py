"""The image's HEALTHCHECK: asks hub's own gRPC health service, exit 0 only for SERVING.

    python healthcheck.py [SERVICE]      # default user.v1.UserService (readiness); "" is liveness

It dials 127.0.0.1:$HUB_PORT (default 50051) in plaintext, as Kubernetes' native gRPC probes
do: a hub serving TLS (--tls-cert) needs another probe. Health is always public, so no token
is sent. Exit status: 0 SERVING, 1 anything else (NOT_SERVING, no answer, refused).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

READINESS = "user.v1.UserService"


def check(target: str, service: str, timeout: float = 2.0) -> str:
    """The service's status name (SERVING, NOT_SERVING, ...) or the gRPC error's code name."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str]) -> int:
    service = argv[1] if len(argv) > 1 else READINESS
    target = f"127.0.0.1:{os.environ.get('HUB_PORT', '50051')}"
    status = check(target, service)
    if status != "SERVING":
        print(f"hub health {service or '(liveness)'} on {target}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
