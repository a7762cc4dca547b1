"""`hub serve --workers N`: N real worker processes on one port behind a supervisor, sharing
one Redis, judged by what a client and an operator see."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import psutil
import pytest

from harness.hub import HubProcess
from harness.redis import free_port
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_sync_service_pb2 as spb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.api.user.v1.user_sync_service_pb2_grpc import UserSyncServiceStub

CREATE = "/user.v1.UserService/CreateUser"


def fresh_channel(target: str) -> grpc.Channel:
    """A channel with a TCP connection of its own (channels in one process otherwise share
    one), so the kernel picks a worker for it."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


@pytest.fixture
def start_workers(hub_process: Callable[..., HubProcess]) -> Callable[..., HubProcess]:
    """A `hub serve --workers N` supervisor on a port it picks, once every worker serves
    (the harness reads the port and the workers' pids from its log)."""

    def start(redis_url: str, *flags: str, workers: int = 2) -> HubProcess:
        return hub_process(redis_url, workers=workers, port=0, args=[
            "--heartbeat-interval", "0.2", "--shutdown-grace", "2", *flags])

    return start


def metrics_ports() -> int:
    """A port whose next one is free too (worker i serves metrics on port + i)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


def created_ok(metrics_port: int) -> int:
    """CreateUser calls that one worker answered OK, from its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    for line in text.decode().splitlines():
        labels, _, value = line.rpartition(" ")
        if (labels.startswith("hub_rpcs_total{") and f'method="{CREATE}"' in labels
                and 'code="OK"' in labels):
            return int(float(value))
    return 0


def exited(pids: list[int], timeout: float) -> bool:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive


class Subscriber:
    """A Sync stream following every user, read on a thread of its own."""

    def __init__(self, target: str) -> None:
        self._channel = fresh_channel(target)
        self._done = threading.Event()
        self._responses = UserSyncServiceStub(self._channel).Sync(self._requests(), timeout=60)
        self.live = threading.Event()
        self.created: list[str] = []  # emails, as their events arrive
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[spb.SyncRequest]:
        yield spb.SyncRequest(subscribe=common_pb2.Subscribe())
        self._done.wait()

    def _read(self) -> None:
        try:
            for response in self._responses:
                self.live.set()  # the first response (a heartbeat at least): subscribed
                self.created += [e.user.email for e in response.events
                                 if e.type == common_pb2.EVENT_TYPE_CREATED]
        except grpc.RpcError:
            pass  # cancelled by close()

    def wait_for(self, count: int, timeout: float = 15) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.created) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.created)

    def close(self) -> None:
        self._done.set()
        self._responses.cancel()
        self._reader.join(timeout=5)
        self._channel.close()


def test_two_workers_share_port_users_and_feed_and_stop_on_sigterm(
    start_workers: Callable[..., HubProcess], redis_url: str
) -> None:
    metrics = metrics_ports()
    server = start_workers(redis_url, "--metrics-port", str(metrics))
    output = server.output()
    assert len(re.findall(r"hub listening on", output)) == 1  # once, by the supervisor
    assert f"hub listening on 127.0.0.1:{server.port} (plaintext, no auth, 2 workers)" in output
    try:
        import uvloop  # noqa: F401
        assert output.count("event loop: uvloop") == 2
    except ImportError:
        assert output.count("event loop: asyncio") == 2
    supervisor = psutil.Process(server.proc.pid)
    children = {child.pid for child in supervisor.children(recursive=True)}
    assert set(server.worker_pids) <= children
    assert all(psutil.Process(pid).is_running() for pid in server.worker_pids)

    subscriber = Subscriber(server.target)
    try:
        assert subscriber.live.wait(10)
        emails = [f"w{i}@example.com" for i in range(40)]
        for email in emails:  # each through a connection of its own
            with fresh_channel(server.target) as channel:
                UserServiceStub(channel).CreateUser(pb.CreateUserRequest(email=email),
                                                    timeout=10)
        # Writes landed on both workers (each counts its own calls)...
        per_worker = [created_ok(metrics), created_ok(metrics + 1)]
        assert sum(per_worker) == len(emails)
        assert min(per_worker) > 0, per_worker
        # ... so some were made on the worker the subscriber is not on, and it got them all:
        # the fan-out crosses workers through Redis.
        assert sorted(subscriber.wait_for(len(emails))) == sorted(emails)
    finally:
        subscriber.close()
    with fresh_channel(server.target) as channel:
        listed = list(UserServiceStub(channel).ListUsers(pb.ListUsersRequest(), timeout=10))
    assert sorted(u.email for u in listed) == sorted(emails)

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=20) == 0, server.output()
    assert exited(sorted(children), timeout=5), "a process outlived the supervisor"
    output = server.output()
    assert output.count("hub stopped") == 3  # each worker, then the supervisor
    assert "second signal" not in output  # one SIGTERM: a graceful drain, not "stop now"


def test_more_than_one_worker_needs_redis(hub_process: Callable[..., HubProcess]) -> None:
    # No Redis URL (the harness sets HUB_REDIS_URL=""). The log holds what serve says (stderr).
    for workers in ("2", "0"):
        result = hub_process(args=["--workers", workers], start=False)
        assert result.run() == 2, result.output()
        assert "needs --redis-url" in result.output()
        assert "Traceback" not in result.output()
    from_env = hub_process(start=False, HUB_WORKERS="2")
    assert from_env.run() == 2 and "needs --redis-url" in from_env.output()
    refused = hub_process(args=["--workers", "-1"], start=False)
    assert refused.run() == 2 and "workers" in refused.output()


def test_a_dead_worker_stops_the_others_and_the_supervisor_fails(
    start_workers: Callable[..., HubProcess], redis_url: str
) -> None:
    server = start_workers(redis_url)
    victim, survivor = server.worker_pids
    psutil.Process(victim).kill()
    assert server.proc.wait(timeout=20) == 1
    assert exited([survivor], timeout=5)
    output = server.output()
    assert f"worker 0 (pid {victim}) exited with signal SIGKILL unasked" in output
    assert f"worker 1 (pid {survivor}) exited with code 0" in output  # drained


def test_workers_die_with_a_killed_supervisor(
    start_workers: Callable[..., HubProcess], redis_url: str
) -> None:
    server = start_workers(redis_url)
    server.proc.kill()
    server.proc.wait()
    assert exited(server.worker_pids, timeout=10)
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", server.port))


def test_a_port_another_server_holds_is_not_shared(
    hub_process: Callable[..., HubProcess], redis_url: str
) -> None:
    # A listener with SO_REUSEPORT, as another `hub serve --workers` has: joining it would
    # split its clients with a stranger. The supervisor refuses instead.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = hub_process(redis_url, workers=2, port=port, start=False)
        code = result.run()
    assert code == 1
    assert f"cannot bind 127.0.0.1:{port}" in result.output()
    assert "worker 0 started" not in result.output()
