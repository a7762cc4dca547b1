"""What an operator reads: the access log as JSON fields, sampled or off; /metrics with the
process, platform and build series and no `_created` series."""

from __future__ import annotations

import json
import logging
import urllib.request

import anyio
import anyio.to_thread
import grpc
import pytest

from harness.redis import free_port
from hub import metrics
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.logs import JsonFormatter
from hub.rpc.server import HubServer
from hub.settings import Settings

pytestmark = pytest.mark.anyio
MISSING = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "hub.access"]


async def calls(settings: Settings) -> None:
    async with HubServer(settings) as hub, \
            grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        stub = UserServiceStub(channel)
        for i in range(20):
            await stub.CreateUser(pb.CreateUserRequest(email=f"u{i}@example.com"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetUser(pb.GetUserRequest(user_id=MISSING), timeout=5)


async def test_access_log_lines_carry_json_fields(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="hub.access"):
        await calls(Settings(port=0))
    lines = access_lines(caplog)
    assert len(lines) == 21
    entry = json.loads(JsonFormatter().format(lines[0]))
    assert entry["method"] == "/user.v1.UserService/CreateUser"
    assert entry["code"] == "OK" and isinstance(entry["duration_ms"], float)
    assert entry["principal"] == "anonymous" and entry["peer"].startswith("ipv4:127.0.0.1")
    failed = json.loads(JsonFormatter().format(lines[-1]))
    assert failed["code"] == "NOT_FOUND" and failed["method"].endswith("/GetUser")


async def test_access_log_samples_successes_and_keeps_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="hub.access"):
        await calls(Settings(port=0, access_log_sample=0.0))
    assert [r.__dict__["code"] for r in access_lines(caplog)] == ["NOT_FOUND"]


async def test_access_log_off_writes_nothing_but_metrics_still_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def created() -> float:
        return metrics.REGISTRY.get_sample_value(
            "hub_rpcs_total", {"method": "/user.v1.UserService/CreateUser", "code": "OK"}) or 0

    before = created()
    with caplog.at_level(logging.INFO, logger="hub.access"):
        await calls(Settings(port=0, access_log=False))
    assert access_lines(caplog) == []
    assert created() - before == 20


async def test_metrics_have_process_platform_and_build_series_and_no_created() -> None:
    port = free_port()
    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    async with HubServer(Settings(port=0, metrics_port=port)):
        text = await anyio.to_thread.run_sync(scrape)
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info",
            "hub_build_info", "hub_event_bus_connected"} <= names
    assert not [n for n in names if n.endswith("_created")]


async def test_tracing_sends_a_span_per_rpc_to_the_exporter() -> None:
    """--otlp-endpoint turns on OpenTelemetry's grpc.aio interceptor; here the process has a
    tracer provider of its own with an in-memory exporter, which hub then uses."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    settings = Settings(port=0, otlp_endpoint="http://127.0.0.1:4317")
    async with HubServer(settings) as hub, \
            grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        await UserServiceStub(channel).CreateUser(
            pb.CreateUserRequest(email="traced@example.com"), timeout=5)
    spans = [s for s in exporter.get_finished_spans()
             if s.name == "/user.v1.UserService/CreateUser"]
    assert len(spans) == 1
    assert spans[0].kind is trace.SpanKind.SERVER
    assert spans[0].attributes is not None
    assert spans[0].attributes.get("rpc.method") == "CreateUser"
