"""The Redis store: records, indexes and event history in Redis, every write one Lua call.

Keys (prefix `hub` by default):
    {prefix}:user:{id}   hash  v=version, d=msgpack record (with the password hash, if any)
    {prefix}:emails      hash  casefolded email -> id (uniqueness, case-insensitive)
    {prefix}:ids         zset  every id, score 0, so ZRANGE BYLEX pages in id (= creation) order
    {prefix}:offsets     hash  partition -> last offset
    {prefix}:epoch       string, set by the first write; a Redis that lost its data gets a new one
    {prefix}:log:{p}     stream of partition p's events, entry id `{offset}-0`, field e=event
Channel {prefix}:ev:{p} carries each write's events of partition p (see write.lua).
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from importlib.resources import files
from typing import Any, TypeVar, cast

import msgpack
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from hub import metrics
from hub.domain import (
    Event,
    EventBatch,
    EventType,
    NewUser,
    Position,
    User,
    UserPatch,
    UserStatus,
    email_key,
    now_us,
    partition_of,
    tombstone,
)
from hub.errors import (
    AlreadyExists,
    Contention,
    HubError,
    NotFound,
    StoreUnavailable,
    VersionConflict,
)
from hub.store.base import BulkResult
from hub.store.locks import KeyedLock

_WRITE_LUA = files("hub.store").joinpath("write.lua").read_text()
_T = TypeVar("_T")
_OK, _NOT_FOUND, _EMAIL_TAKEN, _VERSION_MISMATCH, _ID_TAKEN = range(5)
# An update without expected_version retries its read-modify-write when another writer wins
# the race; this many losses in a row means the user is too hot to update, so say ABORTED.
_CAS_ATTEMPTS = 16
_TYPE_CODE = {EventType.CREATED: "c", EventType.UPDATED: "u", EventType.DELETED: "d"}


def _user_fields(u: User) -> list[Any]:
    return [u.id, u.email, u.name, int(u.status), u.created_at, u.updated_at, u.version]


def _user_from(fields: Sequence[Any]) -> User:
    id_, email, name, status, created, updated, version = fields[:7]
    return User(id_, email, name, UserStatus(status), created, updated, version)


def encode_event(type_: EventType, user: User, ts: int) -> bytes:
    """An event as stored in history and published: msgpack [type, user fields, ts]."""
    return msgpack.packb([int(type_), _user_fields(user), ts])


def decode_batch(message: bytes) -> EventBatch:
    """A published message: msgpack (epoch, partition, first offset, count), then its events,
    decoded only if the batch's events are asked for."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(message)
    epoch, partition, first, count = next(unpacker), next(unpacker), next(unpacker), next(unpacker)

    def events() -> list[Event]:
        out = []
        offset = first
        for type_, fields, ts in unpacker:
            out.append(Event(EventType(type_), _user_from(fields), partition, offset, epoch, ts))
            offset += 1
        return out

    return EventBatch(epoch, partition, first, count, events)


async def _read_again(read: Callable[[], Awaitable[_T]]) -> _T:
    """Runs a read, and once more if its connection had been closed by Redis (a restart
    leaves every pooled connection dead, and each fails once): a read changes nothing, so
    repeating it on a fresh connection is safe. Writes are never repeated this way."""
    try:
        return await read()
    except redis_errors.ConnectionError as exc:
        if isinstance(exc, redis_errors.AuthenticationError | redis_errors.BusyLoadingError):
            raise
        return await read()


@contextmanager
def _unavailable() -> Iterator[None]:
    """Redis connection trouble becomes StoreUnavailable, the one error callers handle."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        metrics.STORE_ERRORS.inc()
        if isinstance(exc, redis_errors.AuthenticationError):
            raise StoreUnavailable(
                "the user store refused hub's credentials (check the Redis URL's user and"
                " password)") from exc
        if isinstance(exc, redis_errors.TimeoutError):
            raise StoreUnavailable("the user store did not answer in time") from exc
        if isinstance(exc, redis_errors.BusyLoadingError):
            raise StoreUnavailable("the user store is loading its data") from exc
        raise StoreUnavailable() from exc


class RedisStore:
    """Usage:

        store = RedisStore(redis.asyncio.Redis.from_url("redis://localhost:6379/0"))
        event = await store.create(NewUser.build("ada@example.com", "Ada", UserStatus.ACTIVE))
    """

    def __init__(
        self,
        client: aioredis.Redis,
        partitions: int = 16,
        history_size: int = 10_000,
        prefix: str = "hub",
        history_max_age: float = 86_400.0,
    ) -> None:
        self.partitions = partitions
        # redis-py types every reply as a bytes/str union whatever decode_responses says; this
        # client never decodes, so replies are bytes and are treated as such.
        self._r: Any = client
        self._history_size = history_size
        self._history_max_age_ms = int(history_max_age * 1000)
        self._p = prefix
        self._write = client.register_script(_WRITE_LUA)
        self._user_locks = KeyedLock()
        self._emails, self._ids = f"{prefix}:emails", f"{prefix}:ids"
        self._offsets, self._epoch = f"{prefix}:offsets", f"{prefix}:epoch"

    @classmethod
    def from_url(cls, url: str, pool_size: int = 64, **kwargs: Any) -> RedisStore:
        # A blocking pool: a burst of store calls beyond pool_size waits for a connection
        # (up to the socket timeout) instead of failing at once, as redis-py's default pool
        # does past its limit, which callers would see as UNAVAILABLE.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=5,
            socket_connect_timeout=2, socket_timeout=5, health_check_interval=10,
        )
        return cls(aioredis.Redis.from_pool(pool), **kwargs)

    def _user_key(self, user_id: str) -> str:
        return f"{self._p}:user:{user_id}"

    def _log_key(self, partition: int) -> str:
        return f"{self._p}:log:{partition}"

    def _channel(self, partition: int) -> str:
        return f"{self._p}:ev:{partition}"

    # -- reads ----------------------------------------------------------------------------

    async def _read(self, user_id: str) -> tuple[User, str | None]:
        key = self._user_key(user_id)
        with _unavailable():
            raw = await _read_again(lambda: self._r.hget(key, "d"))
        if raw is None:
            raise NotFound(user_id)
        fields = msgpack.unpackb(raw)
        return _user_from(fields), fields[7]

    async def get(self, user_id: str) -> User:
        return (await self._read(user_id))[0]

    async def password_hash(self, user_id: str) -> str | None:
        return (await self._read(user_id))[1]

    async def list_after(self, after_id: str, limit: int) -> list[User]:
        start = f"({after_id}" if after_id else "-"

        async def read() -> list[bytes | None]:
            ids = await self._r.zrange(self._ids, start, "+", bylex=True, offset=0, num=limit)
            if not ids:
                return []
            async with self._r.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.hget(self._user_key(i.decode()), "d")
                return cast(list[bytes | None], await pipe.execute())

        with _unavailable():
            raws = await _read_again(read)
        # A user deleted between the two calls is skipped, as if listed a moment later.
        return [_user_from(msgpack.unpackb(raw)) for raw in raws if raw is not None]

    async def history(self, partition: int, after_offset: int, limit: int) -> list[Event]:
        async def read() -> tuple[bytes, list[Any]]:
            return await self._r.get(self._epoch), await self._r.xrange(
                self._log_key(partition), min=f"{after_offset + 1}-0", max="+", count=limit
            )

        with _unavailable():
            epoch, entries = await _read_again(read)
        out = []
        for entry_id, data in entries:
            type_, fields, ts = msgpack.unpackb(data[b"e"])
            offset = int(entry_id.split(b"-", 1)[0])
            out.append(
                Event(EventType(type_), _user_from(fields), partition, offset, epoch.decode(), ts)
            )
        return out

    async def position(self) -> Position:
        async def read() -> list[Any]:
            # SET NX only ever sets the first epoch: doing it twice is harmless.
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.set(self._epoch, secrets.token_hex(4), nx=True)
                pipe.get(self._epoch)
                pipe.hmget(self._offsets, list(range(self.partitions)))
                return cast(list[Any], await pipe.execute())

        with _unavailable():
            _, epoch, offsets = await _read_again(read)
        return Position(epoch.decode(), tuple(int(o or 0) for o in offsets))

    # -- writes ---------------------------------------------------------------------------

    async def create(self, new: NewUser) -> Event:
        (result,) = await self.create_many([new])
        if isinstance(result, HubError):
            raise result
        return result

    async def create_many(self, rows: Sequence[NewUser]) -> list[BulkResult]:
        ops = [
            _Op(EventType.CREATED, r.user, 0, "", email_key(r.user.email), r.password_hash)
            for r in rows
        ]
        # Creates never race (they check existence in the script), so no _Raced comes back.
        return cast(list[BulkResult], await self._apply(ops))

    async def update(
        self, user_id: str, patch: UserPatch, expected_version: int | None = None
    ) -> Event:
        def op(current: User, pw_hash: str | None) -> _Op:
            updated = patch.apply(current)
            return _Op(EventType.UPDATED, updated, current.version,
                       email_key(current.email), email_key(updated.email), pw_hash)

        return await self._compare_and_set(user_id, expected_version, op)

    async def delete(self, user_id: str, expected_version: int | None = None) -> Event:
        def op(current: User, _hash: str | None) -> _Op:
            key = email_key(current.email)
            return _Op(EventType.DELETED, tombstone(current), current.version, key, key, None)

        return await self._compare_and_set(user_id, expected_version, op)

    async def _compare_and_set(
        self, user_id: str, expected_version: int | None,
        make_op: Callable[[User, str | None], _Op],
    ) -> Event:
        """Read, build the change, write it only if the version is still the one read.

        Writers on one user in this process queue on a lock, so they never race each other;
        only writers on other instances can win a race, and then we re-read and retry after a
        jittered pause (without expected_version: with it, the caller asked to fail instead).
        """
        async with self._user_locks.hold(user_id):
            for attempt in range(_CAS_ATTEMPTS):
                current, pw_hash = await self._read(user_id)
                if expected_version is not None and current.version != expected_version:
                    raise VersionConflict(user_id, expected_version, current.version)
                (result,) = await self._apply([make_op(current, pw_hash)])
                if not isinstance(result, _Raced):
                    return _raise_or_return(result)
                if expected_version is not None:
                    raise VersionConflict(user_id, expected_version, result.stored)
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise Contention(user_id)

    async def _apply(self, ops: Sequence[_Op]) -> list[BulkResult | _Raced]:
        ts = now_us()
        partitions = [partition_of(op.user.id, self.partitions) for op in ops]
        # Every op travels in one msgpack argument: redis-py encodes each argument separately,
        # which for a bulk batch of eight per row cost more than the script itself. Redis's
        # cmsgpack predates msgpack's bin type, so bytes go as (binary-safe) str.
        packed = msgpack.packb([
            [_TYPE_CODE[op.type], op.user.id, op.expected, op.old_email, op.new_email,
             b"" if op.type is EventType.DELETED else op.record(), p,
             encode_event(op.type, op.user, ts)]
            for op, p in zip(ops, partitions, strict=True)
        ], use_bin_type=False)
        with _unavailable():
            reply = await self._write(
                keys=[self._emails, self._ids, self._offsets, self._epoch],
                args=[secrets.token_hex(4), self._history_size, f"{self._p}:", ts // 1000,
                      self._history_max_age_ms, packed],
            )
        epoch = reply[0].decode()
        out: list[BulkResult | _Raced] = []
        for i, (op, p) in enumerate(zip(ops, partitions, strict=True)):
            status, value = reply[1 + 2 * i], reply[2 + 2 * i]
            out.append(_result(status, value, op, p, epoch, ts))
        return out

    # -- events ---------------------------------------------------------------------------

    @asynccontextmanager
    async def listen(self) -> AsyncIterator[AsyncIterator[EventBatch]]:
        pubsub = self._r.pubsub(ignore_subscribe_messages=True)
        channels = [self._channel(p) for p in range(self.partitions)]
        try:
            with _unavailable():
                await pubsub.subscribe(*channels)
                # Wait for every confirmation: from here on, no published event is missed.
                confirmed = 0
                while confirmed < len(channels):
                    message = await pubsub.parse_response(block=True, timeout=5)
                    if message is None:
                        raise StoreUnavailable("pub/sub subscription was not confirmed")
                    confirmed += message[0] in (b"subscribe", "subscribe")

            async def batches() -> AsyncIterator[EventBatch]:
                while True:
                    with _unavailable():
                        message = await pubsub.get_message(timeout=None)
                    if message is not None and message["type"] == "message":
                        yield decode_batch(message["data"])

            yield batches()
        finally:
            await pubsub.aclose()

    async def ping(self) -> None:
        with _unavailable():
            await self._r.ping()

    async def aclose(self) -> None:
        await self._r.aclose()


class _Op:
    __slots__ = ("expected", "new_email", "old_email", "pw_hash", "type", "user")

    def __init__(
        self, type_: EventType, user: User, expected: int,
        old_email: str, new_email: str, pw_hash: str | None,
    ) -> None:
        self.type, self.user, self.expected = type_, user, expected
        self.old_email, self.new_email, self.pw_hash = old_email, new_email, pw_hash

    def record(self) -> bytes:
        return msgpack.packb([*_user_fields(self.user), self.pw_hash])


class _Raced:
    """The stored version moved between our read and our write."""

    def __init__(self, stored: int) -> None:
        self.stored = stored


def _result(
    status: int, value: int, op: _Op, partition: int, epoch: str, ts: int
) -> BulkResult | _Raced:
    if status == _OK:
        return Event(op.type, op.user, partition, value, epoch, ts)
    if status == _NOT_FOUND:
        return NotFound(op.user.id)
    if status == _EMAIL_TAKEN:
        return AlreadyExists("email", f"email {op.user.email} is already registered")
    if status == _VERSION_MISMATCH:
        return _Raced(value)
    return AlreadyExists("id", f"user id {op.user.id} is already taken")


def _raise_or_return(result: BulkResult) -> Event:
    if isinstance(result, HubError):
        raise result
    return result
