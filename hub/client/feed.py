"""`SyncFeed`: UserSyncService.Sync as an async iterator that resumes by itself.

It yields a `SyncBatch` per response; a `Resynced` (a SyncBatch too) when it has resumed by
state because the history it would resume from was trimmed; and a `ContinuityLost` when even
that cannot continue it (a fresh snapshot follows). The resume token it keeps is the one the
server sends, in responses and under `hub.resume.RESUME_TOKEN_KEY` in trailing metadata.
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
    """One SyncResponse: its events (in order per user) and the token positioned after them.

    `resync`: the events are part of a resync by state still in progress (each event also says
    so, `event.resync`): EVENT_TYPE_SNAPSHOT is a user's current state, EVENT_TYPE_DELETED a
    user deleted since. `resume_token` is then the token the resync started from, so saving
    it is always safe: resuming from it runs the resync again.
    """

    events: Sequence[common_pb2.UserEvent]
    resume_token: str
    snapshot_complete: bool = False
    resync: bool = False


@dataclass(frozen=True, slots=True)
class Resynced(SyncBatch):
    """The response that ends a resync by state (`resync_complete`): the feed resumed from a
    token whose events had left the history (trimmed by size or age), or fell that far behind,
    and instead of replaying them the hub sent every followed user changed since at its
    current state and every one deleted since. The batches before this one carried those
    events (`SyncBatch.resync`); a view that applied them (keeping a user if its version is
    newer, dropping it on EVENT_TYPE_DELETED) now equals the hub's, and what follows is live.

    `updated` and `deleted` are the ids the resync sent, in the order sent (a resync cut and
    run again counts each id once). Being a SyncBatch, it carries the last response's own
    events and its token, which the feed now resumes from.
    """

    updated: Sequence[str] = ()
    deleted: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class ContinuityLost:
    """The feed could not be continued without a gap: the events since the last token are
    gone and a resync by state cannot stand in for them (`reason` EPOCH_CHANGED: the history
    was reset or replaced; HISTORY_EXPIRED: trimmed, and tombstones of deletions since are gone
    too, or the feed was made with `resync=False`). The feed goes on with a fresh snapshot
    (EVENT_TYPE_SNAPSHOT events, then `snapshot_complete`); a live view should rebuild its state
    from it.

    From the status's google.rpc.ErrorInfo metadata ("" when the hub sent none): `action`,
    what the hub recommends (RESYNC_BY_STATE or SNAPSHOT); `epoch`, the history's current
    epoch; `earliest_position`, a token at the earliest position its history still reaches.
    """

    reason: str
    message: str
    action: str = ""
    epoch: str = ""
    earliest_position: str = ""


FeedItem = SyncBatch | ContinuityLost


class SyncFeed:
    """An async iterator over UserSyncService.Sync that resumes by itself.

        async with SyncFeed(["hub-a:50051", "hub-b:50051"], snapshot=True) as feed:
            async for item in feed:
                if isinstance(item, ContinuityLost):
                    view.clear()                 # a snapshot follows
                    continue
                for event in item.events:
                    view.apply(event)            # keep a user if event.user.version is newer
                if isinstance(item, Resynced):   # a resync by state was applied
                    log(f"resynced: {len(item.updated)} changed, {len(item.deleted)} deleted")
                checkpoint(item.resume_token)    # feed.resume_token is the same

    On a lost connection, an instance going away, RESOURCE_EXHAUSTED (too slow) or the stream's
    deadline, it reconnects (with capped exponential backoff and jitter, moving on to the next
    address after a failure) and resumes from its last token: no event is lost or repeated.
    A snapshot cut off before it completed is started again instead, and so is a resync.
    Other errors (e.g. INVALID_ARGUMENT) are raised as ClientError.

    `resync` (default on): a resume from a token whose events have left the history, or a
    stream that fell so far behind that its position left it, is done by state
    (Subscribe.catch_up = CATCH_UP_STATE; see `Resynced`) rather than ended with OUT_OF_RANGE
    and a full snapshot. `resync=False` keeps the old behaviour.

    `min_position` (a write's `Written.position`, or any token): the feed's first response
    waits until the instance it reached has routed every event up to it, so a write made
    through another instance is in what the feed shows (read-your-writes). It is sent until
    the first response arrives (an instance that cannot reach it in time answers UNAVAILABLE
    and the feed tries again, moving on to the next address), then dropped: later resumes
    continue from a token past it. A position of a history since replaced (EPOCH_CHANGED) is
    dropped too, with the ContinuityLost that says so.
    """

    def __init__(
        self,
        targets: str | Sequence[str] = DEFAULT_TARGET,
        user_ids: Iterable[str] = (),
        *,
        resume_token: str = "",
        snapshot: bool = False,
        conflate: bool = False,
        resync: bool = True,
        min_position: str = "",
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
        self._resync = resync
        self._min_position = min_position
        # Long-lived, yet never without a deadline: when it passes, the feed simply resumes.
        self._stream_timeout = stream_timeout
        self._backoff = backoff
        self._options = options
        self._credentials = credentials
        self._iterator: AsyncGenerator[FeedItem, None] | None = None
        # A resync by state is under way (its first event came, resync_complete not yet), and
        # the ids it has sent (dicts: ordered sets), kept across a cut one that runs again.
        self._resyncing = False
        self._updated: dict[str, None] = {}
        self._deleted: dict[str, None] = {}
        self.reconnects = 0

    def __aiter__(self) -> AsyncIterator[FeedItem]:
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

    def _subscribe(self) -> common_pb2.Subscribe:
        subscribe = common_pb2.Subscribe(
            user_ids=self._users, resume_token=self.resume_token, snapshot=self._snapshot,
            conflate=self._conflate, min_position=self._min_position,
        )
        if self._resync:
            # Also for a stream that starts live: one that falls behind past the history
            # (it stopped reading for long) is then resynced in place rather than cut.
            subscribe.catch_up = common_pb2.CATCH_UP_STATE
        return subscribe

    async def _run(self) -> AsyncGenerator[FeedItem, None]:
        failures, index = 0, 0
        while True:
            target = self._targets[index % len(self._targets)]
            async with _aio_channel(target, self._options, self._credentials) as channel:
                call = spb_grpc.UserSyncServiceStub(channel).Sync(timeout=self._stream_timeout)
                # An error the feed cannot resume from reaches the caller as a ClientError.
                with _mapped():
                    try:
                        await call.write(spb.SyncRequest(subscribe=self._subscribe()))
                        async for response in call:
                            failures = 0
                            self._min_position = ""  # reached: resumes start past it
                            yield self._item(response)
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

    def _item(self, response: spb.SyncResponse) -> SyncBatch:
        """The item for one response, taking up its token where it is safe to resume from."""
        if self._snapshot and response.snapshot_complete:
            self._snapshot = False
        for event in response.events:
            if event.resync:
                self._resyncing = True
                self._note_resync(event)
        if response.resync_complete:
            self.resume_token = response.resume_token
            done = Resynced(response.events, response.resume_token, response.snapshot_complete,
                            False, tuple(self._updated), tuple(self._deleted))
            self._end_resync()
            return done
        if self._resyncing:
            # Mid-resync tokens are not adopted: a resync cut off runs again from the old one.
            return SyncBatch(response.events, self.resume_token, response.snapshot_complete,
                             True)
        if not self._snapshot:
            # Mid-snapshot tokens are not adopted: a cut snapshot restarts.
            self.resume_token = response.resume_token
        return SyncBatch(response.events, response.resume_token, response.snapshot_complete)

    def _end_resync(self) -> None:
        self._resyncing, self._updated, self._deleted = False, {}, {}

    def _note_resync(self, event: common_pb2.UserEvent) -> None:
        user_id = event.user.id
        if event.type == common_pb2.EVENT_TYPE_DELETED:
            self._updated.pop(user_id, None)
            self._deleted[user_id] = None
        else:
            self._deleted.pop(user_id, None)
            self._updated[user_id] = None

    def _on_error(self, err: grpc.aio.AioRpcError) -> ContinuityLost | None:
        """Decides what an ended stream means: returns the signal to give the caller, if any,
        before the feed resumes, or raises `err` again when it cannot resume from it."""
        code = err.code()
        if code is grpc.StatusCode.OUT_OF_RANGE:
            self.resume_token, self._snapshot = "", True
            self._end_resync()
            lost = _continuity_lost(err)
            if lost.reason == _EPOCH_CHANGED:
                # A min_position of the replaced history can never be reached (the hub would
                # refuse it again): the snapshot of the new one is what there is to show.
                self._min_position = ""
            return lost
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            for key, value in err.trailing_metadata() or ():
                if key == RESUME_TOKEN_KEY and not self._snapshot and not self._resyncing:
                    self.resume_token = str(value)
            return None
        if code in _RESUMABLE:
            return None
        raise err


_EPOCH_CHANGED: Final = "EPOCH_CHANGED"
_RESUMABLE: Final = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED,
})


def _continuity_lost(err: grpc.aio.AioRpcError) -> ContinuityLost:
    status = rpc_status.from_call(cast(grpc.Call, err))
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            metadata = info.metadata
            return ContinuityLost(
                str(info.reason), err.details() or "", metadata.get("action", ""),
                metadata.get("epoch", ""), metadata.get("earliest_position", ""))
    return ContinuityLost("UNKNOWN", err.details() or "")
