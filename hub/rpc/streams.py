"""Live streams: UserUpdates (the seed's bidi RPC, one User per message) and the batched,
resumable UserSyncService.Sync feed. Both share one session type.

Per stream: a reader task applies the client's requests as they come; the RPC handler's own task
is the one writer of the stream, and sends whatever the subscription buffered as ONE response
(so batches grow with load, and an idle stream gets an event as soon as it happens). The
handler cancels and awaits its reader before it returns, so the reader never outlives it.
Subscribes and Unsubscribes are the writer's to act on (in order, between responses); the
reader hands over one at a time, and reads on once the writer has taken it.

What a Subscribe costs is the ids it names, never the ids the stream already follows: its ids
are validated, counted against max_stream_users and added 1,000 at a time, the event loop
taking a turn in between, so a stream sending Subscribe after Subscribe of 10,000 ids does not
hold up every other call.

Heartbeats are due `heartbeat_interval` after a stream's last response. One timer per process
(`_Heartbeats`) wakes the streams that are due, in the order of their last response, instead of
one timer per stream: an idle stream holds only what it must.

Every way a stream ends with a status goes through its subscription: the reader fails it with
a refused request, the engine with HistoryLost (an epoch change, events lost before delivery).
The writer raises the error at its next turn, never in the middle of a write: gRPC cannot send
a status while a cancelled write is still in flight (the call would hang with none).

A stream too slow for the live feed is not cut: once its subscription's buffer passes its bound
the engine drops the buffer and stops pushing to it (see hub.fanout), and the writer, whenever
its client reads again, catches up from the history at the client's pace (`_catch_up`), then
rejoins the live feed with no gap and no duplicate. Only a position that has left the history
ends it (OUT_OF_RANGE), unless its first Subscribe asked for a resync by state.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any, TypeAlias

import grpc

from hub import errors, metrics, resume
from hub.api.user.v1 import common_pb2, user_sync_service_pb2
from hub.commands import Commands
from hub.domain import Position, User
from hub.errors import EPOCH_CHANGED, HISTORY_EXPIRED, SNAPSHOT
from hub.fanout import Encoded, Fanout, Subscription
from hub.principal import READ, caller
from hub.resume import RESUME_TOKEN_KEY
from hub.rpc.errors import WithTrailing, code_of
from hub.rpc.wire import change_of, encode_snapshot, sync_response, timestamp, user_to_pb
from hub.settings import Settings
from hub.store.base import Store
from hub.validation import (
    catch_up_violation,
    check,
    first_subscribe_violations,
    stream_users_over,
    subscribe_size_violation,
    subscribes_over,
    user_id_violation,
)

log = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_SNAPSHOT_PAGE = 500
# Ids of one Subscribe/Unsubscribe validated, or added to the subscription, between two turns
# of the event loop: a stream sending Subscribes of 10,000 ids one after another must not hold
# every other call up for the whole of each.
_ID_CHUNK = 1000
# Users of a named-users snapshot read from the store at once (one batch in flight per stream,
# well under the Redis pool, so other calls still get connections).
_SNAPSHOT_READS = 100
# Room left in a response for its token, change results and framing.
_RESPONSE_HEADROOM = 64 * 1024
# A replay's chunks (one per partition and 500 events) go out together up to this many event
# bytes: a resume a few thousand events back is a few responses, not one per partition.
_REPLAY_BATCH_BYTES = 128 * 1024
_EVENT_BYTES = operator.attrgetter("event")


def _size(items: list[Encoded]) -> int:
    """The bytes `items` take in a response, as _chunks counts them (summed in C: a replay
    storm sends millions of items)."""
    return sum(map(len, map(_EVENT_BYTES, items))) + 6 * len(items)


def _conflated(items: list[Encoded]) -> list[Encoded]:
    """The newest of each user's items (a conflated stream's replay responses)."""
    latest: dict[str, Encoded] = {}
    for item in items:
        latest.pop(item.user_id, None)
        latest[item.user_id] = item
    return list(latest.values())


def _chunks(items: list[Encoded], budget: int) -> list[list[Encoded]]:
    """Items split into runs whose encoded size stays within `budget` (at least one each)."""
    if _size(items) <= budget:
        return [items]  # nearly always: one response
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


class _Heartbeats:
    """When each subscribed Sync stream is next due a heartbeat, on ONE timer for the process.

    Every stream's next beat is (its last response) + interval, so keeping the streams in the
    order of their last response keeps them in due order: the timer only ever looks at the
    first one. A stream the timer wakes goes to the back too; if it could not send (a write
    stalled on its client), it is woken again one interval later.
    """

    __slots__ = ("_due", "_interval", "_timer")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        # OrderedDict, not dict: taking from the front and moving to the back are O(1).
        self._due: OrderedDict[_Stream, float] = OrderedDict()  # loop time of the next beat
        self._timer: asyncio.TimerHandle | None = None

    def add(self, stream: _Stream) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self._interval
        self._due[stream] = due
        self._due.move_to_end(stream)
        if self._timer is None:
            self._timer = loop.call_at(due, self._fire)

    def sent(self, stream: _Stream) -> None:
        """`stream` just sent a response: its next beat is a whole interval away."""
        if stream in self._due:
            self.add(stream)

    def discard(self, stream: _Stream) -> None:
        self._due.pop(stream, None)

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._due:
            stream, due = next(iter(self._due.items()))
            if due > now:
                self._timer = loop.call_at(due, self._fire)
                return
            self._due[stream] = now + self._interval
            self._due.move_to_end(stream)
            stream.beat()


class LiveStreams:
    def __init__(self, fanout: Fanout, ops: Commands, settings: Settings) -> None:
        self.fanout = fanout
        self.ops = ops
        self.settings = settings
        self.heartbeats = _Heartbeats(settings.heartbeat_interval)
        self._last_token: tuple[Position | None, str] = (None, "")
        self._open: set[Subscription] = set()  # every open stream's, to end them at shutdown
        self._ending: errors.ShuttingDown | None = None

    def end_all(self) -> None:
        """Shutdown: every open stream ends now with UNAVAILABLE and its resume token, and a
        stream that opens from now on is refused the same way."""
        self._ending = errors.ShuttingDown()
        for sub in list(self._open):
            sub.fail(self._ending)

    def token(self, position: Position) -> str:
        """The resume token of `position`. Idle streams all stand at the engine's one shared
        position: encoding it once gives them one string, not a copy each."""
        last, token = self._last_token
        if last != position:
            token = resume.encode(position)
            self._last_token = (position, token)
        return token

    async def serve(self, requests: AsyncIterable[Any], context: Context, batched: bool) -> None:
        """Runs one stream until the client leaves or it fails; failures end it with a status."""
        stream: _Stream | None = None
        error: Exception | None = None
        label = "sync" if batched else "user_updates"
        try:
            if self._ending is not None:
                raise self._ending
            async with self.fanout.subscribe(users=set()) as sub:  # nobody until a Subscribe
                self._open.add(sub)
                stream = _Stream(self, sub, context, batched)
                expires = caller().expires_at - time.time()
                expiry = asyncio.get_running_loop().call_later(
                    max(0.0, expires), sub.fail, errors.Unauthenticated("token expired")
                ) if expires != float("inf") else None
                metrics.ACTIVE_STREAMS.labels(label).inc()
                # One task more than the handler's own, not a TaskGroup of two: per idle stream,
                # the group, its second task and their futures and callbacks cost more than the
                # rest of the stream's state. The guarantees are kept by hand: the reader never
                # raises (it hands every error to the subscription, which the writer raises), and
                # it is cancelled and awaited below whichever way the writer ends.
                reader = asyncio.create_task(stream.read(requests))
                try:
                    await stream.write()
                finally:
                    reader.cancel()
                    self._open.discard(sub)
                    self.heartbeats.discard(stream)
                    metrics.ACTIVE_STREAMS.labels(label).dec()
                    if expiry is not None:
                        expiry.cancel()
                    await asyncio.wait((reader,))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            error = exc
        if error is None:
            return
        # Every ending carries the token of the last response sent (the resume point).
        token = stream.token if stream else ""
        if isinstance(error, errors.SlowConsumer):
            error.resume_token = token
            metrics.SLOW_CONSUMERS.inc()
        elif isinstance(error, errors.HistoryLost):
            # Its continuity details (current epoch, earliest position): a copy, since one
            # error can end many streams.
            error = await self.fanout.continuity(error)
        # The handler's Aborting turns it into the status (or drops it if the client is
        # gone: nobody to tell). Not set on the error itself: one error can end many streams.
        raise WithTrailing(error, ((RESUME_TOKEN_KEY, token),) if token else ())


class _Stream:
    # Slots, and lists made only when there is something to put in them: one of these lives
    # for every open stream, and most are idle.
    __slots__ = ("_active", "_batched", "_beat", "_by_state", "_context", "_controls", "_live",
                 "_results", "_sub", "_subscribes", "_taken", "token")

    def __init__(
        self, live: LiveStreams, sub: Subscription, context: Context, batched: bool
    ) -> None:
        self._live = live
        self._sub = sub
        self._context = context
        self._batched = batched
        self._controls: list[common_pb2.Subscribe | common_pb2.Unsubscribe] | None = None
        self._taken: asyncio.Future[None] | None = None  # the reader waits for the writer
        self._results: list[user_sync_service_pb2.ChangeResult] | None = None
        self._subscribes = 0  # Subscribe requests read so far
        self._active = False  # the writer has set up the first subscription
        self._beat = False  # a heartbeat is due
        # Its first Subscribe asked for a resync by state (catch_up = CATCH_UP_STATE) where
        # its position has left the history, instead of OUT_OF_RANGE.
        self._by_state = False
        self.token = ""  # the resume token of the last response sent

    def beat(self) -> None:
        self._beat = True
        self._sub.wake()

    # -- reader ---------------------------------------------------------------------------

    async def read(self, requests: AsyncIterable[Any]) -> None:
        try:
            async for request in requests:
                await self._take(request)
                self._sub.wake()
                del request  # not held through the wait for the next one
        except Exception as exc:
            # Ended by the writer, between writes (see the module docstring).
            self._sub.fail(exc)

    async def _take(self, request: Any) -> None:
        kind = request.WhichOneof("request")
        if kind == "subscribe":
            await self._check_subscribe(request.subscribe)
            await self._control_later(request.subscribe)
        elif kind == "unsubscribe":
            check(*await _id_violations(request.unsubscribe.user_ids, "unsubscribe.user_ids"))
            await self._control_later(request.unsubscribe)
        elif kind == "change":
            await self._change(request.change)
        else:
            raise errors.InvalidArgument.of("request", "names no subscribe, unsubscribe"
                                            " or change")

    async def _control_later(
        self, request: common_pb2.Subscribe | common_pb2.Unsubscribe
    ) -> None:
        """Queues `request` for the writer, once it has taken the one queued before: the
        reader stops reading meanwhile (so gRPC's flow control stops the client), and a
        stream cannot pile up Subscribes of 10,000 ids in memory behind a writer that is
        busy, or stalled on its client."""
        while self._controls:
            self._taken = asyncio.get_running_loop().create_future()
            await self._taken
        self._controls = [request]

    async def _check_subscribe(self, sub: common_pb2.Subscribe) -> None:
        self._subscribes += 1
        settings = self._live.settings
        over = subscribes_over(self._subscribes, settings.max_subscribes_per_stream)
        if over is not None:
            raise over
        if sub.snapshot:
            # A snapshot is every followed user's record (email, name): what GetUser and
            # ListUsers show only to users:read. Live events stay open to users:subscribe.
            caller().require(READ, "subscribe.snapshot")
        check(subscribe_size_violation(len(sub.user_ids), settings.max_subscription_users))
        check(
            *await _id_violations(sub.user_ids, "subscribe.user_ids"),
            *first_subscribe_violations(self._subscribes, bool(sub.resume_token), sub.conflate,
                                        bool(sub.catch_up), bool(sub.min_position)),
            catch_up_violation(sub.catch_up),
        )
        partitions = self._live.fanout.partitions
        if sub.resume_token:
            resume.decode(sub.resume_token, partitions, "subscribe.resume_token")
        if sub.min_position:
            resume.decode(sub.min_position, partitions, "subscribe.min_position")

    async def _change(self, change: Any) -> None:
        if not self._batched:
            # UserUpdates has no result message: a refused change ends the stream.
            await self._live.ops.apply(change_of(change))
            return
        result = user_sync_service_pb2.ChangeResult(request_id=change.request_id)
        try:
            event = await self._live.ops.apply(change_of(change))
            result.user.CopyFrom(user_to_pb(event.user))
            # For Subscribe.min_position, as the unary RPCs' trailing hub-position.
            result.position = resume.covering((event,), self._live.fanout.partitions)
        except errors.HubError as exc:
            result.code, result.message = code_of(exc).value[0], str(exc)
            if isinstance(exc, errors.InvalidArgument):
                for v in exc.violations:
                    result.violations.add(field=v.field, description=v.description)
            if isinstance(exc, errors.StoreUnavailable):
                log.warning("streamed change refused: %s", exc)
        if self._results is None:
            self._results = []
        self._results.append(result)

    # -- writer ---------------------------------------------------------------------------

    async def write(self) -> None:
        while True:
            await self._sub.wait()
            if self._sub.lagging:
                # Controls wait until it is live again: a Subscribe acted on mid-catch-up
                # would have its users' events replayed from before it.
                await self._catch_up()
            # Send what was buffered before acting on new controls: a snapshot or replay
            # response must not carry a token past events still waiting here.
            await self._flush()
            if self._controls:
                await self._act()

    async def _catch_up(self) -> None:
        """The subscription passed its buffer bound and the engine stopped pushing to it (see
        hub.fanout): read the history from where the stream stands, at the client's pace (each
        send waits for the client's flow control), towards the engine's position, which moves
        meanwhile; once within half the bound, rejoin the live feed at the engine's position
        P and replay up to P, as a resume does. Memory stays bounded: the engine buffers
        nothing for it meanwhile, and a replay response holds at most _REPLAY_BATCH_BYTES."""
        sub, fanout = self._sub, self._live.fanout
        limits = fanout.limits
        near = max(1, limits.max_events // 2)
        try:
            while sub.lagging:
                if sub.error is not None:
                    raise sub.error
                start = sub.given
                try:
                    while True:
                        lag = fanout.lag(sub, start)
                        metrics.CATCHUP_LAG.observe(lag)
                        if lag <= near:
                            fanout.rejoin(sub)  # live from P = its new origin, pushed from now
                            await self._replay(start)  # start..P: no gap, no duplicate
                            break  # and round again if it fell behind during that replay
                        until = fanout.position()
                        items, size = await self._replay(start, until)
                        start = until
                        if items:  # and within half the byte bound too, at this event size
                            near = max(1, min(limits.max_events // 2,
                                              limits.max_bytes // 2 * items // max(1, size)))
                except errors.HistoryLost as exc:
                    if not self._resyncs(exc):
                        raise
                    await self._resync()  # live again from its end (or round again)
        except errors.HistoryLost:
            metrics.SLOW_CONSUMERS.inc()  # fell out of the history: cut
            raise
        sub.caught_up()

    async def _replay(self, start: Position, until: Position | None = None
                      ) -> tuple[int, int]:
        """Sends the events between `start` and `until` (default: the origin) that the
        subscription wants, from the history, a few chunks per response, each response with
        the token of where it brings the stream. Returns how many it sent, and their bytes."""
        sub = self._sub
        batch: list[Encoded] = []
        size, reached = 0, None
        sent = total = 0
        async for items, position in self._live.fanout.replay(sub, start, until):
            if sub.error is not None:
                raise sub.error  # ended meanwhile: a refused request, an epoch change, shutdown
            batch += items
            size += _size(items)
            reached = position
            if size >= _REPLAY_BATCH_BYTES:
                await self._send_replayed(batch, position)
                sent, total = sent + len(batch), total + size
                batch, size, reached = [], 0, None
        if reached is not None:
            await self._send_replayed(batch, reached)
        return sent + len(batch), total + size

    async def _send_replayed(self, items: list[Encoded], position: Position) -> None:
        if self._sub.conflate:
            items = _conflated(items)
        results, self._results = self._results or (), None
        await self._send(items, resume.encode(position), results)

    async def _act(self) -> None:
        """Acts on the controls read so far, and on any the reader adds meanwhile."""
        while self._controls:
            # Taken whole: the reader may add the next while one is acted on (it waits for
            # this take); that one is taken next, still before anything newer is flushed.
            controls, self._controls = self._controls, None
            taken, self._taken = self._taken, None
            if taken is not None and not taken.done():
                taken.set_result(None)
            for request in controls:
                await self._control(request)

    async def _flush(self) -> None:
        items, position = self._sub.drain()
        results, self._results = self._results or (), None
        # Before the first subscription is set up there is no position to hand out yet.
        token = self._live.token(position) if self._active else self.token
        beat, self._beat = self._beat, False  # only subscribed Sync streams are ever due one
        if items or results or beat:
            await self._send(items, token, results)

    async def _send(
        self, items: list[Encoded], token: str,
        results: Iterable[user_sync_service_pb2.ChangeResult] = (), complete: bool = False,
        resynced: bool = False,
    ) -> None:
        """Sends `items`, then a tail with `token`, `results`, snapshot_complete=`complete` and
        resync_complete=`resynced` (UserUpdates sends only the items)."""
        # The token moves before the write: once handed to gRPC the message is queued ahead of
        # any status, so a stream cut while this write waits on a stalled client still
        # delivers it, and the token given with RESOURCE_EXHAUSTED must be past it.
        self._live.heartbeats.sent(self)
        metrics.EVENTS_DELIVERED.inc(len(items))
        if self._batched:
            # A backlog can exceed the message size limit: it goes out in several responses.
            # All but the last keep the previous token (they are not yet past the whole
            # backlog): a cut between them repeats events on resume, never skips one.
            chunks = _chunks(items, self._live.settings.max_message_bytes - _RESPONSE_HEADROOM)
            for chunk in chunks[:-1]:
                await self._context.write(sync_response(
                    chunk, user_sync_service_pb2.SyncResponse(resume_token=self.token)))
            # `token` itself, not read back from the message: protobuf would make a new string,
            # where idle streams can all share one (see LiveStreams.token).
            self.token = token
            tail = user_sync_service_pb2.SyncResponse(
                resume_token=token, results=results, snapshot_complete=complete,
                resync_complete=resynced)
            await self._context.write(sync_response(chunks[-1], tail))
            return
        # UserUpdates sends one message per event, so a cut can fall between them: the token
        # moves only once all are handed over (a resume may repeat some; versions tell).
        for item in items:
            await self._context.write(item.user)
        self.token = token

    async def _control(self, request: common_pb2.Subscribe | common_pb2.Unsubscribe) -> None:
        if isinstance(request, common_pb2.Unsubscribe):
            if not request.user_ids:
                self._sub.remove_users(None)  # everything
                return
            async for _, chunk in _in_chunks(request.user_ids):
                self._sub.remove_users(chunk)
            return
        users: set[str] | None = set(request.user_ids) or None
        if not self._active:
            if users is not None:
                await self._check_stream_users(list(users), set())
            if request.min_position:
                await self._hold(request.min_position)
            self._sub.conflate = request.conflate
            self._by_state = request.catch_up == common_pb2.CATCH_UP_STATE
            self._active = True
            if self._batched:  # UserUpdates has no heartbeats
                self._live.heartbeats.add(self)
            await self._first(request, users)
        else:
            await self._add(users)
        if request.snapshot and not request.resume_token:  # a resume replays instead
            await self._snapshot(users)

    async def _hold(self, min_position: str) -> None:
        """Subscribe.min_position (read-your-writes): the subscription is set up, so its first
        response (live, replay or snapshot) comes, only once this instance's engine has routed
        every partition up to the position: a write made through any instance is then in what
        the stream shows. UNAVAILABLE after settings.min_position_timeout."""
        fanout = self._live.fanout
        position = resume.decode(min_position, fanout.partitions, "subscribe.min_position")
        await fanout.wait_for(position, self._live.settings.min_position_timeout, self._sub)
        if self._sub.error is not None:
            raise self._sub.error  # ended meanwhile (shutdown, a refused request)

    async def _first(self, request: common_pb2.Subscribe, users: set[str] | None) -> None:
        """The stream's first Subscribe: its users are indexed in one step, at the origin its
        token and any replay start from (at most max_subscription_users ids)."""
        fanout = self._live.fanout
        if request.resume_token:
            start = resume.decode(request.resume_token, fanout.partitions)
            try:
                await fanout.reach(start)
                fanout.restart(self._sub, users)
                self.token = request.resume_token
                try:
                    await self._replay(start)
                except errors.HistoryLost as exc:
                    if not self._resyncs(exc):
                        raise
                    await self._resync()
                    metrics.RESUMES.labels("resynced").inc()
                    return
            except errors.HistoryLost as exc:
                metrics.RESUMES.labels(exc.reason.lower()).inc()
                raise
            metrics.RESUMES.labels("resumed").inc()
            return
        fanout.restart(self._sub, users)
        if not self.token:
            self.token = self._live.token(self._sub.origin)

    def _resyncs(self, lost: errors.HistoryLost) -> bool:
        """Whether this stream resyncs by state rather than end with `lost`: its first
        Subscribe asked, and the history was trimmed (an epoch change is another history:
        nothing since the position can be trusted)."""
        return self._by_state and lost.reason == HISTORY_EXPIRED

    async def _resync(self) -> None:
        """Resync by state, from where the stream stands (its last token): every followed
        user changed since, at its current state, and every one deleted since, as resync
        events; then resync_complete with the token of the subscription's origin; then live.

        The subscription is live from its origin on (rejoined here if it was lagging), and
        the state is read after it, so it covers every change up to the origin; a change
        after it may show in both (its version tells). Until resync_complete, responses keep
        the token the stream stood at: cut meanwhile, a resume resyncs again from it.

        Not gated on users:read as a snapshot is: it shows only users changed since a
        position whose events the subscriber was entitled to, and they carried the same
        records."""
        sub, fanout = self._sub, self._live.fanout
        if sub.lagging:
            fanout.rejoin(sub)
        token = self.token
        since = resume.decode(token, fanout.partitions)
        store = self._live.ops.store
        for p in sorted(sub.partitions(fanout.partitions)):
            cursor: int | None = None
            while True:
                page = await store.state_since(p, since.offsets[p], cursor, _SNAPSHOT_PAGE)
                if sub.error is not None:
                    raise sub.error
                if page is None:
                    raise errors.HistoryLost(
                        HISTORY_EXPIRED, f"changes after offset {since.offsets[p]} of"
                        f" partition {p} are older than the tombstone retention: a resync by"
                        " state cannot tell every deletion since; start again from a snapshot",
                        action=SNAPSHOT)
                if since.epoch and page.epoch != since.epoch:
                    raise errors.HistoryLost(
                        EPOCH_CHANGED, f"history epoch {since.epoch} is gone (now"
                        f" {page.epoch}): the event history was reset; start again from a"
                        " snapshot")
                items = [_encode_resynced(u, False) for u in page.users if sub.matches(u.id)]
                items += [_encode_resynced(u, True) for u in page.deleted if sub.matches(u.id)]
                if items:
                    await self._send(items, token)
                if page.cursor is None:
                    break
                cursor = page.cursor
        await self._send([], self._live.token(sub.origin), resynced=True)

    async def _add(self, users: set[str] | None) -> None:
        """A later Subscribe: its users join the subscription, each live from when it is
        added. Costs the ids given, a chunk at a time, never the ids already followed."""
        followed = self._sub.users
        if users is None or followed is None:
            self._sub.add_users(users)  # all users: one entry, however many there are
            return
        ids = list(users)
        await self._check_stream_users(ids, followed)
        async for _, chunk in _in_chunks(ids):
            if self._sub.error is not None:
                return  # ended meanwhile (the writer raises it next): nothing to route to
            self._sub.add_users(chunk)

    async def _check_stream_users(self, ids: Sequence[str], followed: set[str]) -> None:
        """LimitExceeded, with nothing changed yet, when following `ids` (distinct) as well
        would take the stream past max_stream_users users."""
        limit = self._live.settings.max_stream_users
        fresh = len(ids)
        if followed:
            fresh = 0
            async for _, chunk in _in_chunks(ids):
                fresh += sum(1 for u in chunk if u not in followed)
        over = stream_users_over(len(followed) + fresh, limit)
        if over is not None:
            raise over

    async def _snapshot(self, users: set[str] | None) -> None:
        """The current state of `users` (None: everyone) as SNAPSHOT events. The token stays
        where it was: every change after it still arrives live, so none is lost."""
        store = self._live.ops.store
        if users is None:
            after = ""
            while True:
                page = await store.list_after(after, _SNAPSHOT_PAGE)
                if page:
                    await self._send([encode_snapshot(u) for u in page], self.token)
                    after = page[-1].id
                if len(page) < _SNAPSHOT_PAGE:
                    break
        else:
            # Read _SNAPSHOT_READS at a time, concurrently: one round trip per batch rather
            # than per user, with one batch of one stream in flight at once.
            ids = sorted(users)
            found: list[Encoded] = []
            for start in range(0, len(ids), _SNAPSHOT_READS):
                batch = ids[start:start + _SNAPSHOT_READS]
                found += [encode_snapshot(user) for user in
                          await asyncio.gather(*(_get(store, u) for u in batch)) if user]
                if len(found) >= _SNAPSHOT_PAGE:
                    await self._send(found, self.token)
                    found = []
            if found:
                await self._send(found, self.token)
        if self._batched:
            await self._send([], self.token, complete=True)


def _encode_resynced(user: User, deleted: bool) -> Encoded:
    """A resync event: a changed user's current state (EVENT_TYPE_SNAPSHOT), or a deleted
    user as its tombstone carries it, with deleted_at as its delete event had it (rare
    enough to be encoded per stream, unlike live events)."""
    pb = user_to_pb(user)
    if deleted:
        pb.deleted_at.CopyFrom(timestamp(user.updated_at))
    kind = common_pb2.EVENT_TYPE_DELETED if deleted else common_pb2.EVENT_TYPE_SNAPSHOT
    event = common_pb2.UserEvent(type=kind, user=pb, resync=True)
    return Encoded(user.id, event.SerializeToString(), pb.SerializeToString())


async def _get(store: Store, user_id: str) -> User | None:
    try:
        return await store.get(user_id)
    except errors.NotFound:
        return None


async def _in_chunks(ids: Sequence[str]) -> AsyncIterator[tuple[int, Sequence[str]]]:
    """`ids` in runs of _ID_CHUNK (with the index of each run's first id), the event loop
    taking a turn between two runs."""
    for start in range(0, len(ids), _ID_CHUNK):
        if start:
            await asyncio.sleep(0)
        yield start, ids[start:start + _ID_CHUNK]


async def _id_violations(ids: Sequence[str], field: str) -> list[errors.FieldViolation]:
    """A violation per malformed id, every one of them (check reports them all at once)."""
    found: list[errors.FieldViolation] = []
    async for start, chunk in _in_chunks(ids):
        found += [v for i, u in enumerate(chunk, start)
                  if (v := user_id_violation(u, f"{field}[{i}]")) is not None]
    return found
