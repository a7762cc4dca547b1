"""Connection-level limits: keepalive enforcement, connection age (streams rebalance and the
feed resumes), and the cap on concurrent password hashing."""

from __future__ import annotations

import threading
import time

import anyio
import grpc
import pytest

from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_sync_service_pb2 as spb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.api.user.v1.user_sync_service_pb2_grpc import UserSyncServiceStub
from hub.client import SyncBatch, SyncFeed
from hub.passwords import PasswordHashing
from hub.rpc.server import HubServer
from hub.settings import Settings
from hub.store.memory import MemoryStore

pytestmark = pytest.mark.anyio


async def test_a_client_pinging_too_often_is_sent_away() -> None:
    # The server allows a ping every 10 s without data; this client pings every second.
    pushy = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 1000),
             ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
             ("grpc.use_local_subchannel_pool", 1)]
    async with HubServer(Settings(port=0, heartbeat_interval=60), store=MemoryStore()) as hub, \
            grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}", options=pushy) as channel:
        call = UserSyncServiceStub(channel).Sync(timeout=30)
        await call.write(spb.SyncRequest(subscribe=common_pb2.Subscribe()))
        with anyio.fail_after(20), pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_connection_age_rebalances_streams_and_the_feed_resumes() -> None:
    settings = Settings(port=0, heartbeat_interval=0.2, max_connection_age=1.0,
                        max_connection_age_grace=0.5)
    async with HubServer(settings, store=MemoryStore()) as hub, \
            grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        stub = UserServiceStub(channel)
        feed = SyncFeed(f"127.0.0.1:{hub.port}", backoff=(0.05, 0.2))
        emails: list[str] = []
        written: list[str] = []

        async def consume() -> None:
            async for item in feed:
                assert isinstance(item, SyncBatch)
                emails.extend(e.user.email for e in item.events)
                if len(emails) >= 40:
                    return

        async def write() -> None:
            await anyio.sleep(0.3)
            for i in range(40):
                user = await stub.CreateUser(pb.CreateUserRequest(email=f"a{i}@example.com"),
                                             timeout=5)
                written.append(user.email)
                await anyio.sleep(0.1)  # spread over several connection lifetimes

        with anyio.fail_after(30):
            async with feed, anyio.create_task_group() as tg:
                tg.start_soon(consume)
                tg.start_soon(write)
        assert feed.reconnects >= 1  # the server recycled the connection at least once
        assert sorted(emails) == sorted(written)  # and nothing was lost or repeated


def test_password_hashing_is_capped() -> None:
    running, peak = 0, 0
    lock = threading.Lock()

    class SlowHasher:
        def hash(self, password: str) -> str:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            time.sleep(0.05)
            with lock:
                running -= 1
            return "$argon2id$fake"

    hashing = PasswordHashing(limit=2, hasher=SlowHasher())  # type: ignore[arg-type]

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(hashing.hash, f"password{i}")

    anyio.run(main)
    assert peak == 2
