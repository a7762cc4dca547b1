"""user.v1.UserSyncService: the batched, resumable feed, served by the stream engine."""

from __future__ import annotations

from collections.abc import AsyncIterable

from hub.api.user.v1 import user_sync_service_pb2, user_sync_service_pb2_grpc
from hub.rpc.streams import Context, LiveStreams


class UserSyncService(user_sync_service_pb2_grpc.UserSyncServiceServicer):
    def __init__(self, live: LiveStreams) -> None:
        self._live = live

    async def Sync(  # type: ignore[override]
        self, request_iterator: AsyncIterable[user_sync_service_pb2.SyncRequest],
        context: Context,
    ) -> None:
        await self._live.serve(request_iterator, context, batched=True)
