"""Live streams: UserUpdates (the seed's bidi RPC, one User per message) and the batched,
resumable UserSyncService.Sync feed. Both share one session type.

Per stream: a reader task applies the client's requests as they come; a writer task is the one
writer of the stream, and sends whatever the subscription buffered as ONE response (so batches
grow with load, and an idle stream gets an event as soon as it happens). Both run in a
TaskGroup owned by the RPC handler.

Every way a stream ends with a status goes through its subscription: the reader fails it with
a refused request, the engine with SlowConsumer or ContinuityLost. The writer raises the error
at its next turn, never in the middle of a write: gRPC cannot send a status while a cancelled
write is still in flight (the call would hang with none). For a stalled client the engine has
already dropped its buffer and unregistered it; the status reaches the client right after the
responses it has not read yet, whenever it reads again (or keepalive ends a dead connection).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterable
from typing import Any, TypeAlias

import grpc

from hub import errors, metrics, tokens
from hub.api.user.v1 import common_pb2, user_sync_service_pb2, user_sync_service_pb2_grpc
from hub.fanout import Encoded, Fanout, Subscription
from hub.ops import UserOps
from hub.principal import caller
from hub.settings import Settings
from hub.status import code_of, to_status
from hub.validation import check, user_id_violation
from hub.wire import RESUME_TOKEN_KEY, encode_snapshot, sync_response, user_to_pb

log = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_SNAPSHOT_PAGE = 500
# Room left in a response for its token, change results and framing.
_RESPONSE_HEADROOM = 64 * 1024


def _chunks(items: list[Encoded], budget: int) -> list[list[Encoded]]:
    """Items split into runs whose encoded size stays within `budget` (at least one each)."""
    chunks: list[list[Encoded]] = [[]]
    size = 0
    for item in items:
        cost = len(item.event) + 6  # tag and length prefix
        if chunks[-1] and size + cost > budget:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += cost
    return chunks


class LiveStreams:
    def __init__(self, fanout: Fanout, ops: UserOps, settings: Settings) -> None:
        self.fanout = fanout
        self.ops = ops
        self.settings = settings

    async def serve(self, requests: AsyncIterable[Any], context: Context, batched: bool) -> None:
        """Runs one stream until the client leaves or it fails; failures end it with a status."""
        stream: _Stream | None = None
        error: BaseException | None = None
        try:
            sub = await self.fanout.open(users=set())  # follows nobody until a Subscribe
            stream = _Stream(self, sub, context, batched)
            expires = caller().expires_at - time.time()
            expiry = asyncio.get_running_loop().call_later(
                max(0.0, expires), sub.fail, errors.Unauthenticated("token expired")
            ) if expires != float("inf") else None
            metrics.ACTIVE_STREAMS.labels("sync" if batched else "user_updates").inc()
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(stream.read(requests))
                    tg.create_task(stream.write())
            finally:
                sub.close()
                metrics.ACTIVE_STREAMS.labels("sync" if batched else "user_updates").dec()
                if expiry is not None:
                    expiry.cancel()
        except* errors.HubError as group:
            error = group.exceptions[0]
        except* grpc.aio.AbortError:
            raise
        except* Exception as group:
            error = group.exceptions[0]
        if error is not None and context.done():
            # The client went away (cancelled) while a write was pending: nobody to tell.
            log.debug("stream ended by its client: %r", error)
            return
        if error is not None:
            token = stream.token if stream else ""
            extra = ((RESUME_TOKEN_KEY, token),) if token else ()
            if isinstance(error, errors.SlowConsumer):
                error.resume_token = token
                metrics.SLOW_CONSUMERS.inc()
            await context.abort_with_status(to_status(error, extra))


class UserSyncService(user_sync_service_pb2_grpc.UserSyncServiceServicer):
    def __init__(self, live: LiveStreams) -> None:
        self._live = live

    async def Sync(  # type: ignore[override]
        self, request_iterator: AsyncIterable[user_sync_service_pb2.SyncRequest],
        context: Context,
    ) -> None:
        await self._live.serve(request_iterator, context, batched=True)


class _Stream:
    def __init__(
        self, live: LiveStreams, sub: Subscription, context: Context, batched: bool
    ) -> None:
        self._live = live
        self._fanout = live.fanout
        self._sub = sub
        self._context = context
        self._batched = batched
        self._controls: deque[common_pb2.Subscribe | common_pb2.Unsubscribe] = deque()
        self._results: list[user_sync_service_pb2.ChangeResult] = []
        self._subscribes = 0  # Subscribe requests read so far
        self._active = False  # the writer has set up the first subscription
        self._last_write = time.monotonic()
        self.token = ""  # the resume token of the last response sent

    # -- reader ---------------------------------------------------------------------------

    async def read(self, requests: AsyncIterable[Any]) -> None:
        try:
            await self._read(requests)
        except Exception as exc:
            # Ended by the writer, between writes (see the module docstring).
            self._sub.fail(exc)

    async def _read(self, requests: AsyncIterable[Any]) -> None:
        async for request in requests:
            kind = request.WhichOneof("request")
            if kind == "subscribe":
                self._check_subscribe(request.subscribe)
                self._controls.append(request.subscribe)
            elif kind == "unsubscribe":
                check(*(user_id_violation(u, f"unsubscribe.user_ids[{i}]")
                        for i, u in enumerate(request.unsubscribe.user_ids)))
                self._controls.append(request.unsubscribe)
            elif kind == "change":
                await self._change(request.change)
            else:
                raise errors.InvalidArgument.of("request", "names no subscribe, unsubscribe"
                                                " or change")
            self._sub.wake()

    def _check_subscribe(self, sub: common_pb2.Subscribe) -> None:
        self._subscribes += 1
        settings = self._live.settings
        if self._subscribes > settings.max_subscribes_per_stream:
            raise errors.LimitExceeded(
                "subscribe", f"at most {settings.max_subscribes_per_stream} per stream")
        limit = settings.max_subscription_users
        check(
            *(user_id_violation(u, f"subscribe.user_ids[{i}]")
              for i, u in enumerate(sub.user_ids)),
            errors.FieldViolation("subscribe.user_ids", f"at most {limit} users")
            if len(sub.user_ids) > limit else None,
            errors.FieldViolation("subscribe.resume_token", "only on a stream's first Subscribe")
            if sub.resume_token and self._subscribes > 1 else None,
            errors.FieldViolation("subscribe.conflate", "only on a stream's first Subscribe")
            if sub.conflate and self._subscribes > 1 else None,
        )
        if sub.resume_token:
            tokens.decode(sub.resume_token, self._fanout.partitions, "subscribe.resume_token")

    async def _change(self, change: Any) -> None:
        if not self._batched:
            # UserUpdates has no result message: a refused change ends the stream.
            await self._live.ops.apply(change)
            return
        result = user_sync_service_pb2.ChangeResult(request_id=change.request_id)
        try:
            event = await self._live.ops.apply(change)
            result.user.CopyFrom(user_to_pb(event.user))
        except errors.HubError as exc:
            result.code, result.message = code_of(exc).value[0], str(exc)
            if isinstance(exc, errors.InvalidArgument):
                for v in exc.violations:
                    result.violations.add(field=v.field, description=v.description)
            if isinstance(exc, errors.StoreUnavailable):
                log.warning("streamed change refused: %s", exc)
        self._results.append(result)

    # -- writer ---------------------------------------------------------------------------

    async def write(self) -> None:
        heartbeat = self._live.settings.heartbeat_interval
        while True:
            await self._sub.wait(heartbeat)
            # Send what was buffered before acting on new controls: a snapshot or replay
            # response must not carry a token past events still waiting here.
            await self._flush(heartbeat)
            while self._controls:
                await self._control(self._controls.popleft())

    async def _flush(self, heartbeat: float) -> None:
        items, position = self._sub.drain()
        results, self._results = self._results, []
        # Before the first subscription is set up there is no position to hand out yet.
        token = tokens.encode(position) if self._active else self.token
        due = self._batched and time.monotonic() - self._last_write >= heartbeat
        if items or results or (due and self._active):
            tail = user_sync_service_pb2.SyncResponse(resume_token=token, results=results)
            await self._send(items, tail)

    async def _send(self, items: list[Encoded], tail: user_sync_service_pb2.SyncResponse) -> None:
        # The token moves before the write: once handed to gRPC the message is queued ahead of
        # any status, so a stream cut while this write waits on a stalled client still
        # delivers it, and the token given with RESOURCE_EXHAUSTED must be past it.
        self._last_write = time.monotonic()
        metrics.EVENTS_DELIVERED.inc(len(items))
        if self._batched:
            # A backlog can exceed the message size limit: it goes out in several responses.
            # All but the last keep the previous token (they are not yet past the whole
            # backlog): a cut between them repeats events on resume, never skips one.
            chunks = _chunks(items, self._live.settings.max_message_bytes - _RESPONSE_HEADROOM)
            for chunk in chunks[:-1]:
                await self._context.write(sync_response(
                    chunk, user_sync_service_pb2.SyncResponse(resume_token=self.token)))
            self.token = tail.resume_token
            await self._context.write(sync_response(chunks[-1], tail))
            return
        # UserUpdates sends one message per event, so a cut can fall between them: the token
        # moves only once all are handed over (a resume may repeat some; versions tell).
        for item in items:
            await self._context.write(item.user)
        self.token = tail.resume_token

    async def _control(self, request: common_pb2.Subscribe | common_pb2.Unsubscribe) -> None:
        if isinstance(request, common_pb2.Unsubscribe):
            self._sub.remove_users(request.user_ids or None)
            return
        users: set[str] | None = set(request.user_ids) or None
        if not self._active:
            self._sub.conflate = request.conflate
            self._active = True
        merged = None if users is None or self._sub.users is None else self._sub.users | users
        if request.resume_token:
            start = tokens.decode(request.resume_token, self._fanout.partitions)
            try:
                await self._fanout.reach(start)
                self._fanout.restart(self._sub, merged)
                self.token = request.resume_token
                async for items, position in self._fanout.replay(self._sub, start):
                    tail = user_sync_service_pb2.SyncResponse(
                        resume_token=tokens.encode(position))
                    await self._send(items, tail)
            except errors.ContinuityLost as exc:
                metrics.RESUMES.labels(exc.reason.lower()).inc()
                raise
            metrics.RESUMES.labels("resumed").inc()
            return
        self._fanout.restart(self._sub, merged)
        if not self.token:
            self.token = tokens.encode(self._sub.origin)
        if request.snapshot:
            await self._snapshot(users)

    async def _snapshot(self, users: set[str] | None) -> None:
        """The current state of `users` (None: everyone) as SNAPSHOT events. The token stays
        where it was: every change after it still arrives live, so none is lost."""
        store = self._live.ops.store
        tail = user_sync_service_pb2.SyncResponse(resume_token=self.token)
        if users is None:
            after = ""
            while True:
                page = await store.list_after(after, _SNAPSHOT_PAGE)
                if page:
                    await self._send([encode_snapshot(u) for u in page], tail)
                    after = page[-1].id
                if len(page) < _SNAPSHOT_PAGE:
                    break
        else:
            found = []
            for user_id in sorted(users):
                try:
                    found.append(encode_snapshot(await store.get(user_id)))
                except errors.NotFound:
                    continue
            await self._send(found, tail)
        if self._batched:
            tail.snapshot_complete = True
            await self._send([], tail)
