"""`SyncFeed`: UserSyncService.Sync as an async iterator that resumes by itself.

It yields a `SyncBatch` per response and a `ContinuityLost` when the history it would resume
from is gone (a fresh snapshot follows). The resume token it keeps is the one the server
sends, in responses and under `hub.resume.RESUME_TOKEN_KEY` in trailing metadata.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self, cast

import grpc
import grpc.aio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_sync_service_pb2 as spb
from hub.api.user.v1 import user_sync_service_pb2_grpc as spb_grpc
from hub.client.channel import DEFAULT_TARGET, Credentials, _aio_channel
from hub.client.errors import _mapped
from hub.resume import RESUME_TOKEN_KEY


@dataclass(frozen=True, slots=True)
class SyncBatch:
    """One SyncResponse: its events (in order per user) and the token positioned after them."""

    events: Sequence[common_pb2.UserEvent]
    resume_token: str
    snapshot_complete: bool = False


@dataclass(frozen=True, slots=True)
class ContinuityLost:
    """The feed could not be continued without a gap: the events since the last token are
    gone (`reason` EPOCH_CHANGED: the history was reset; HISTORY_EXPIRED: trimmed). The feed
    goes on with a fresh snapshot (EVENT_TYPE_SNAPSHOT events); a live view should rebuild
    its state from it."""

    reason: str
    message: str


class SyncFeed:
    """An async iterator over UserSyncService.Sync that resumes by itself.

        async with SyncFeed(["hub-a:50051", "hub-b:50051"], snapshot=True) as feed:
            async for item in feed:
                if isinstance(item, ContinuityLost):
                    view.clear()                 # a snapshot follows
                    continue
                for event in item.events:
                    view.apply(event)            # keep a user if event.user.version is newer
                checkpoint(item.resume_token)    # feed.resume_token is the same

    On a lost connection, an instance going away, RESOURCE_EXHAUSTED (too slow) or the stream's
    deadline, it reconnects (with capped exponential backoff and jitter, moving on to the next
    address after a failure) and resumes from its last token: no event is lost or repeated.
    A snapshot cut off before it completed is started again instead. Other errors (e.g.
    INVALID_ARGUMENT) are raised as ClientError.
    """

    def __init__(
        self,
        targets: str | Sequence[str] = DEFAULT_TARGET,
        user_ids: Iterable[str] = (),
        *,
        resume_token: str = "",
        snapshot: bool = False,
        conflate: bool = False,
        stream_timeout: float = 3600.0,
        backoff: tuple[float, float] = (0.05, 5.0),
        options: Sequence[tuple[str, Any]] = (),
        credentials: Credentials | None = None,
    ) -> None:
        self._targets = [targets] if isinstance(targets, str) else list(targets)
        if not self._targets:
            raise ValueError("SyncFeed needs at least one target")
        self._users = list(user_ids)
        self.resume_token = resume_token
        self._snapshot = snapshot and not resume_token
        self._conflate = conflate
        # Long-lived, yet never without a deadline: when it passes, the feed simply resumes.
        self._stream_timeout = stream_timeout
        self._backoff = backoff
        self._options = options
        self._credentials = credentials
        self._iterator: AsyncGenerator[SyncBatch | ContinuityLost, None] | None = None
        self.reconnects = 0

    def __aiter__(self) -> AsyncIterator[SyncBatch | ContinuityLost]:
        self._iterator = self._run()
        return self._iterator

    async def aclose(self) -> None:
        """Ends the stream and closes its channel (also done by `async with`)."""
        if self._iterator is not None:
            await self._iterator.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[SyncBatch | ContinuityLost, None]:
        failures, index = 0, 0
        while True:
            target = self._targets[index % len(self._targets)]
            async with _aio_channel(target, self._options, self._credentials) as channel:
                call = spb_grpc.UserSyncServiceStub(channel).Sync(timeout=self._stream_timeout)
                subscribe = common_pb2.Subscribe(
                    user_ids=self._users, resume_token=self.resume_token,
                    snapshot=self._snapshot, conflate=self._conflate,
                )
                # An error the feed cannot resume from reaches the caller as a ClientError.
                with _mapped():
                    try:
                        await call.write(spb.SyncRequest(subscribe=subscribe))
                        async for response in call:
                            failures = 0
                            if self._snapshot and response.snapshot_complete:
                                self._snapshot = False
                            if not self._snapshot:
                                # Mid-snapshot tokens are not adopted: a cut snapshot restarts.
                                self.resume_token = response.resume_token
                            yield SyncBatch(response.events, response.resume_token,
                                            response.snapshot_complete)
                        code = grpc.StatusCode.OK  # the server ended the stream: resume
                    except grpc.aio.AioRpcError as err:
                        code = err.code()
                        lost = self._on_error(err)
                        if lost is not None:
                            yield lost
                            continue
            self.reconnects += 1
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                continue  # too slow: resume at once from history, same instance
            failures += 1
            index += 1
            low, high = self._backoff
            await asyncio.sleep(random.uniform(0, min(high, low * 2 ** min(failures, 16))))

    def _on_error(self, err: grpc.aio.AioRpcError) -> ContinuityLost | None:
        """Decides what an ended stream means: returns the signal to give the caller, if any,
        before the feed resumes, or raises `err` again when it cannot resume from it."""
        code = err.code()
        if code is grpc.StatusCode.OUT_OF_RANGE:
            self.resume_token, self._snapshot = "", True
            return ContinuityLost(_error_reason(err), err.details() or "")
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            for key, value in err.trailing_metadata() or ():
                if key == RESUME_TOKEN_KEY and not self._snapshot:
                    self.resume_token = str(value)
            return None
        if code in _RESUMABLE:
            return None
        raise err


_RESUMABLE: Final = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED,
})


def _error_reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(cast(grpc.Call, err))
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return "UNKNOWN"
