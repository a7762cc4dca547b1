"""SIGTERM with live streams open: every Sync and UserUpdates stream ends at once with
UNAVAILABLE and its resume token (its client resumes on another instance, losing nothing),
instead of being held for the whole --shutdown-grace; the process then exits."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import anyio
import grpc
import pytest

from harness.hub import HubProcess
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_sync_service_pb2 as spb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.api.user.v1.user_sync_service_pb2_grpc import UserSyncServiceStub
from hub.resume import RESUME_TOKEN_KEY

pytestmark = pytest.mark.anyio
GRACE = 20.0  # long on purpose: ending the streams must not wait for it


@pytest.mark.timeout(60)
async def test_sigterm_ends_live_streams_at_once_with_their_token(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path, env={"HUB_SHUTDOWN_GRACE": str(GRACE),
                                    "HUB_HEARTBEAT_INTERVAL": "0.2"})
    hub.start()
    try:
        async with grpc.aio.insecure_channel(hub.target) as channel:
            sync = UserSyncServiceStub(channel).Sync(timeout=30)
            await sync.write(spb.SyncRequest(subscribe=common_pb2.Subscribe()))
            first = await sync.read()  # a heartbeat: the stream is live, with a token
            assert first.resume_token
            updates = UserServiceStub(channel).UserUpdates(timeout=30)
            await updates.write(pb.UserUpdateRequest(subscribe=common_pb2.Subscribe()))
            await anyio.sleep(0.3)  # its Subscribe is taken

            started = time.monotonic()
            assert hub.proc is not None
            hub.proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(GRACE / 2):
                with pytest.raises(grpc.aio.AioRpcError) as sync_end:
                    while True:
                        await sync.read()
                with pytest.raises(grpc.aio.AioRpcError) as updates_end:
                    await updates.read()
            ended = time.monotonic() - started
        assert sync_end.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (sync_end.value.details() or "")
        trailing = dict(sync_end.value.trailing_metadata() or ())
        assert trailing.get(RESUME_TOKEN_KEY)  # where to resume, on another instance
        assert updates_end.value.code() == grpc.StatusCode.UNAVAILABLE
        code = hub.wait_exit(GRACE / 2)
        drained = time.monotonic() - started
        print(f"SIGTERM with 2 open streams: streams ended after {ended:.2f} s, the process"
              f" exited after {drained:.2f} s (grace {GRACE:.0f} s)")
        assert code == 0, hub.log_tail()
        # Both well inside the grace (20 s): before, the open streams held it all.
        assert ended < GRACE / 2 and drained < GRACE / 2, (ended, drained)
    finally:
        hub.kill()
