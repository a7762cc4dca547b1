"""The Redis store: records, indexes and event history in Redis, every write one Lua call.

Keys (prefix `hub` by default):
    {prefix}:user:{id}   hash  v=version, d=msgpack record (with the password hash, if any)
    {prefix}:emails      hash  casefolded email -> id (uniqueness, case-insensitive)
    {prefix}:ids         zset  every id, score 0, so ZRANGE BYLEX pages in id (= creation) order
    {prefix}:offsets     hash  partition -> last offset
    {prefix}:heads       hash  partition -> the tag (random, one per write call) of its last write
    {prefix}:config      hash  partitions: the count the keyspace was made with (a hub with
                         another count is refused at start-up)
    {prefix}:epoch       string, set at start-up or by the first write; a new one whenever the
                         history is found replaced (Redis came back empty or with older data)
    {prefix}:log:{p}     stream of partition p's events, entry id `{offset}-0`, fields e=event,
                         t=write time (ms), g=the write's tag, q=the tag of the write before it
Channel {prefix}:ev:{p} carries each write's events of partition p (see write.lua).

History identity: the store remembers, per partition, the last offset and tag it has seen
(from its own writes and from position reads). Every write sends that knowledge, and the
script refuses to write onto a history that is behind it (a replica promoted before it had
everything, a Redis restarted from an older snapshot): the store then starts a new epoch, in
one atomic compare-and-set every instance agrees on, and writes there. No write is ever
acknowledged onto a history that silently replaced the one this process saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from importlib.resources import files
from typing import Any, TypeVar, cast

import msgpack
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from hub import metrics
from hub.domain import (
    Event,
    EventBatch,
    EventType,
    Idempotency,
    NewUser,
    Position,
    StatePage,
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
    KeyspaceMismatch,
    NotFound,
    StoreFull,
    StoreUnavailable,
    VersionConflict,
)
from hub.store.base import BulkResult, idempotency_reused
from hub.store.locks import KeyedLock

log = logging.getLogger(__name__)

_WRITE_LUA = files("hub.store").joinpath("write.lua").read_text()
# Reads the position in one atomic step, writing nothing: flagged no-writes, so it runs on a
# replica, under OOM and during CLIENT PAUSE WRITE (a read must never need a write).
_POSITION_LUA = """#!lua flags=no-writes
local fields = {}
for i = 0, tonumber(ARGV[1]) - 1 do fields[#fields + 1] = i end
return {redis.call('GET', KEYS[1]) or false, redis.call('HMGET', KEYS[2], unpack(fields)),
        redis.call('HMGET', KEYS[3], unpack(fields))}
"""
# A new epoch, if the current one is still `ARGV[1]` (or there is none): every instance that
# finds the same history replaced asks at once, and they all end on the first one's epoch.
_ROTATE_LUA = """#!lua
local current = redis.call('GET', KEYS[1])
if not current or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return current
"""
# Resync by state, one page of one partition (see RedisStore.state_since), writing nothing.
# KEYS: 1 floors, 2 the partition's chg zset, 3 dead zset, 4 tomb hash, 5 epoch (or meta
# hash: then ARGV[6] is 'cluster'); ARGV: 1 partition, 2 the offset to resync after, 3 the
# page's start (exclusive), 4 page size, 5 user key prefix.
# Returns false when the floor is past ARGV[2] (tombstones since may be gone), else {epoch,
# changed ids and offsets, their records, deleted ids and offsets, their deletion events}.
STATE_LUA = """#!lua flags=no-writes
local floor, epoch
if ARGV[6] == 'cluster' then
  local meta = redis.call('HMGET', KEYS[5], 'e', 'f')
  epoch, floor = meta[1], tonumber(meta[2] or 0)
else
  floor = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or 0)
  epoch = redis.call('GET', KEYS[5])
end
if tonumber(ARGV[2]) < floor then return false end
local from = '(' .. ARGV[3]
local changed = redis.call('ZRANGE', KEYS[2], from, '+inf', 'BYSCORE', 'LIMIT', 0, ARGV[4],
                           'WITHSCORES')
local dead = redis.call('ZRANGE', KEYS[3], from, '+inf', 'BYSCORE', 'LIMIT', 0, ARGV[4],
                        'WITHSCORES')
local records, tombs = {}, {}
for j = 1, #changed, 2 do
  records[#records + 1] = redis.call('HGET', ARGV[5] .. changed[j], 'd') or false
end
for j = 1, #dead, 2 do
  tombs[#tombs + 1] = redis.call('HGET', KEYS[4], dead[j]) or false
end
return {epoch or false, changed, records, dead, tombs}
"""


def state_page(reply: Any, limit: int, epoch: str | None = None) -> StatePage | None:
    """STATE_LUA's reply as a page: changed users and tombstones merged in offset order, the
    first `limit` of them, and where the next page starts."""
    if reply is None:
        return None
    kept, changed, records, dead, tombs = reply
    entries: list[tuple[int, bool, bytes]] = []
    for j, record in enumerate(records):
        if record is not None:
            entries.append((int(float(changed[2 * j + 1])), False, record))
    for j, tomb in enumerate(tombs):
        if tomb is not None:
            entries.append((int(float(dead[2 * j + 1])), True, tomb))
    entries.sort(key=lambda entry: entry[0])
    more = len(records) >= limit or len(tombs) >= limit or len(entries) > limit
    page = entries[:limit]
    users = [_user_from(msgpack.unpackb(raw)) for _, dead_, raw in page if not dead_]
    deleted = [_user_from(msgpack.unpackb(raw)[1]) for _, dead_, raw in page if dead_]
    shown = epoch if epoch is not None else (kept.decode() if kept else "")
    return StatePage(shown, users, deleted, page[-1][0] if more and page else None)


_T = TypeVar("_T")
_APPLIED, _EPOCH_MOVED, _DIVERGED = range(3)
# A write meets a moved epoch or a replaced history at most once per change of it; a few
# tries cover two instances changing it at once.
_WRITE_TRIES = 4
_OK, _NOT_FOUND, _EMAIL_TAKEN, _VERSION_MISMATCH, _ID_TAKEN = range(5)
# Idempotency: done already under the op's key (value: the key's record), the key used for
# another request, the same as an earlier op of the call (value: its number from 1).
_REPLAYED, _KEY_REUSED, _SAME_AS = 6, 7, 9
# An update without expected_version retries its read-modify-write when another writer wins
# the race; this many losses in a row means the user is too hot to update, so say ABORTED.
_CAS_ATTEMPTS = 16
_TYPE_CODE = {EventType.CREATED: "c", EventType.UPDATED: "u", EventType.DELETED: "d"}


def _user_fields(u: User) -> list[Any]:
    return [u.id, u.email, u.name, int(u.status), u.created_at, u.updated_at, u.version]


def _user_from(fields: Sequence[Any]) -> User:
    id_, email, name, status, created, updated, version = fields[:7]
    return User(id_, email, name, UserStatus(status), created, updated, version)


def pack_event(type_: EventType, user: User, ts: int) -> bytes:
    """An event as stored in history and published: msgpack [type, user fields, ts]."""
    return msgpack.packb([int(type_), _user_fields(user), ts])


def decode_batch(message: bytes, shown: Callable[[int, str], str] | None = None) -> EventBatch:
    """A published message: msgpack (epoch, partition, first offset, count, previous tag,
    tag), then its events, decoded only if the batch's events are asked for. `shown` maps
    (partition, the message's epoch) to the epoch the batch is shown with (see cluster.py)."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(message)
    epoch, partition, first, count = next(unpacker), next(unpacker), next(unpacker), next(unpacker)
    prev_tag, tag = next(unpacker), next(unpacker)
    if shown is not None:
        epoch = shown(partition, epoch)

    def events() -> list[Event]:
        out = []
        offset = first
        for type_, fields, ts in unpacker:
            out.append(Event(EventType(type_), _user_from(fields), partition, offset, epoch, ts))
            offset += 1
        return out

    return EventBatch(epoch, partition, first, count, events, prev_tag, tag)


def tagged_events(partition: int, epoch: str, entries: Sequence[Any]
                  ) -> list[tuple[Event, str, str]]:
    """A history stream's entries (XRANGE) as events, each with the tag of its write and the
    tag of the write before it."""
    out = []
    for entry_id, data in entries:
        type_, fields, ts = msgpack.unpackb(data[b"e"])
        offset = int(entry_id.split(b"-", 1)[0])
        event = Event(EventType(type_), _user_from(fields), partition, offset, epoch, ts)
        out.append((event, data.get(b"g", b"").decode(), data.get(b"q", b"").decode()))
    return out


def no_retry() -> Retry:
    """redis-py's clients re-send a command after a connection error or a timeout (3 times
    by default): a write whose reply was lost would be applied again (a create answered
    "id taken", an update applied twice: seen in the cluster's slot-move test). hub's
    clients never retry by themselves; reads go again once through _read_again, writes are
    never repeated."""
    return Retry(NoBackoff(), 0)


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


# Redis refusals that mean "not now", by the first word of the error: hub answers UNAVAILABLE
# with "the user store (WHERE) ..." and one of these.
_NOT_NOW = {
    "BUSY": "is busy running a script",
    "LOADING": "is loading its data",
    "MASTERDOWN": "has lost its link to its primary",
    "NOREPLICAS": "has too few replicas to accept writes (min-replicas-to-write)",
    "TRYAGAIN": "asked to try again",
    "CLUSTERDOWN": "reports its cluster down",
    "NOPERM": "refused a command: hub's Redis user lacks a permission it needs (check the ACL)",
}


_NOT_NOW_CLASSES: tuple[tuple[type[Exception], str], ...] = (
    (redis_errors.ClusterDownError, "CLUSTERDOWN"),  # MasterDownError is one
    (redis_errors.TryAgainError, "TRYAGAIN"),
)


def _closed_connection(exc: BaseException) -> bool:
    text = str(exc)
    return (isinstance(exc, RuntimeError) and "handler is closed" in text) or (
        isinstance(exc, AttributeError) and "'NoneType' object has no attribute" in text
        and ("write" in text or "transport" in text))


@contextmanager
def _unavailable(write: bool = False, where: str = "") -> Iterator[None]:
    """Redis failures become the errors callers handle: StoreUnavailable (UNAVAILABLE), or
    StoreFull (RESOURCE_EXHAUSTED) when Redis is out of memory. A write whose reply was lost
    may have been applied: the message says its outcome is unknown. Other Redis errors are
    bugs in hub and stay what they are (INTERNAL)."""
    nothing = "; nothing was written" if write else ""
    store = f"the user store ({where})" if where else "the user store"
    try:
        yield
    except redis_errors.OutOfMemoryError as exc:
        metrics.STORE_ERRORS.inc()
        raise StoreFull(
            f"{store} is out of memory (Redis maxmemory)" + nothing) from exc
    except redis_errors.ReadOnlyError as exc:
        metrics.STORE_ERRORS.inc()
        raise StoreUnavailable(
            f"{store} is a read-only replica, not a primary" + nothing) from exc
    except redis_errors.ResponseError as exc:
        # By class where redis-py has one (its message drops the reply's first word, and a
        # pipeline's starts "Command # 1 ..."), else by the reply's first word.
        reply = str(exc).rpartition("of pipeline caused error: ")[2]
        word = next((w for cls, w in _NOT_NOW_CLASSES if isinstance(exc, cls)),
                    reply.split(" ", 1)[0].upper())
        if word not in _NOT_NOW and not isinstance(exc, redis_errors.NoPermissionError):
            raise
        metrics.STORE_ERRORS.inc()
        why = _NOT_NOW.get(word, _NOT_NOW["NOPERM"])
        raise StoreUnavailable(f"{store} {why}{nothing}") from exc
    except (RuntimeError, AttributeError) as exc:
        # redis-py writing on a connection its peer closed can raise these instead of a
        # ConnectionError (redis/redis-py#4287: uvloop's "handler is closed", a transport
        # already gone); anything else of these kinds is a bug and stays one.
        if not _closed_connection(exc):
            raise
        metrics.STORE_ERRORS.inc()
        raise StoreUnavailable(
            f"{store} closed the connection ({_cause(exc)})"
            + ("; the write's outcome is unknown if it was sent" if write else "")) from exc
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        metrics.STORE_ERRORS.inc()
        if isinstance(exc, redis_errors.AuthenticationError):
            raise StoreUnavailable(
                f"{store} refused hub's credentials (check the Redis URL's user and"
                " password)" + nothing) from exc
        if isinstance(exc, redis_errors.BusyLoadingError):
            raise StoreUnavailable(f"{store} {_NOT_NOW['LOADING']}{nothing}") from exc
        if isinstance(exc, redis_errors.TimeoutError):
            raise StoreUnavailable(
                f"{store} did not answer in time"
                + ("; the write's outcome is unknown" if write else "")) from exc
        raise StoreUnavailable(
            f"{store} is unreachable ({_cause(exc)})"
            + ("; the write's outcome is unknown if it was sent" if write else "")) from exc


def too_few_replicas(acked: int, wanted: int, timeout_ms: int, node: str) -> StoreUnavailable:
    """A write WAIT did not see on --redis-replicas-ack replicas: applied on `node` (the
    primary, or a cluster's master), its fate unknown."""
    metrics.STORE_ERRORS.inc()
    return StoreUnavailable(
        f"the write reached {acked} of the {wanted} replica(s) --redis-replicas-ack asks for"
        f" within {timeout_ms} ms: its outcome is unknown (it is on the {node}, and is lost if"
        f" the {node} fails before a replica has it)")


def keyspace_mismatch(prefix: str, made: int, partitions: int) -> str:
    return (f"the Redis keyspace (prefix {prefix!r}) was made with {made} partitions, this hub"
            f" runs with {partitions}: every user's partition and every resume token depend"
            f" on the count; start hub with --partitions {made}, or use an empty Redis")


def _cause(exc: BaseException) -> str:
    """What failed, in redis-py's words (they name the address, never the password)."""
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _sentinel_pool_class() -> type[SentinelConnectionPool]:
    """SentinelConnectionPool that waits for a free connection like BlockingConnectionPool,
    and never hands out a connection to a primary Sentinel has replaced. redis-py drops only
    the idle connections when the primary moves: one busy at that moment went back to the
    pool still connected to the old primary, which can go on answering as one for a while,
    and the next command on it read and wrote a history the new primary does not have (seen
    in the chaos run: two instances starting new epochs on two different nodes)."""

    class Pool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
        def _stale(self, connection: Any) -> bool:
            # Not redis-py's owns_connection: its asyncio version calls a method the base
            # pool does not have.
            return (self.master_address is not None and connection.is_connected
                    and (connection.host, connection.port) != self.master_address)

        async def ensure_connection(self, connection: Any) -> None:
            if self._stale(connection):
                await connection.disconnect()
            await super().ensure_connection(connection)

        async def release(self, connection: Any) -> None:
            if self._stale(connection):
                await connection.disconnect()
            await super().release(connection)

    return Pool


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, str, bool, int]:
    """`redis+sentinel://[:password@]host:port[,host:port...]/MASTER_NAME[/db]` (rediss+ for
    TLS) -> (sentinels, master name, password, tls, db). The password is the master's."""
    scheme, _, rest = url.partition("://")
    tls = scheme == "rediss+sentinel"
    if scheme not in ("redis+sentinel", "rediss+sentinel") or not rest:
        raise ValueError(f"not a redis+sentinel:// URL: {scheme}://...")
    auth, _, rest = rest.rpartition("@")
    password = auth.partition(":")[2] if auth else ""
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError("a redis+sentinel:// URL names its master: .../MASTER_NAME")
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.strip().rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"sentinel address {host!r} is not host:port")
        sentinels.append((name.strip("[]"), int(port)))
    db = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return sentinels, parts[0], password, tls, db


class RecordOps:
    """What the one-node and the cluster store do alike, on top of what each does its own
    way: reading one record (_read_record: its msgpack, or None), a history chunk
    (history_tagged), a batch of creates (create_many) and a compare-and-set
    (_compare_and_set)."""

    async def _read_record(self, user_id: str) -> bytes | None:
        raise NotImplementedError

    async def _read(self, user_id: str) -> tuple[User, str | None]:
        raw = await self._read_record(user_id)
        if raw is None:
            raise NotFound(user_id)
        fields = msgpack.unpackb(raw)
        return _user_from(fields), fields[7]

    async def get(self, user_id: str) -> User:
        return (await self._read(user_id))[0]

    async def password_hash(self, user_id: str) -> str | None:
        return (await self._read(user_id))[1]

    async def history_tagged(
        self, partition: int, after_offset: int, limit: int
    ) -> list[tuple[Event, str, str]]:
        raise NotImplementedError

    async def history(self, partition: int, after_offset: int, limit: int) -> list[Event]:
        return [event for event, _, _ in await self.history_tagged(partition, after_offset, limit)]

    async def create_many(self, rows: Sequence[NewUser]) -> list[BulkResult]:
        raise NotImplementedError

    async def create(self, new: NewUser) -> Event:
        (result,) = await self.create_many([new])
        if isinstance(result, HubError):
            raise result
        return result

    async def _compare_and_set(
        self, user_id: str, expected_version: int | None,
        make_op: Callable[[User, str | None], _Op],
    ) -> Event:
        raise NotImplementedError

    async def update(
        self, user_id: str, patch: UserPatch, expected_version: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> Event:
        def op(current: User, pw_hash: str | None) -> _Op:
            updated = patch.apply(current)
            return _Op(EventType.UPDATED, updated, current.version,
                       email_key(current.email), email_key(updated.email), pw_hash,
                       idempotency)

        return await self._replayed(user_id, idempotency) or await self._compare_and_set(
            user_id, expected_version, op)

    async def delete(
        self, user_id: str, expected_version: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> Event:
        def op(current: User, _hash: str | None) -> _Op:
            key = email_key(current.email)
            return _Op(EventType.DELETED, tombstone(current), current.version, key, key, None,
                       idempotency)

        return await self._replayed(user_id, idempotency) or await self._compare_and_set(
            user_id, expected_version, op)

    async def _replayed(self, user_id: str, idem: Idempotency | None) -> Event | None:
        """The outcome of the write that already used `idem`'s key, read before the write's
        own checks: a retried delete must not find its user gone, nor a retried update its
        version moved (the script checks the key again, atomically with the write)."""
        if idem is None:
            return None
        record = await self._idem_record(user_id, idem.key)
        if record is None:
            return None
        if msgpack.unpackb(record, raw=True)[0].decode() != idem.fingerprint:
            raise idempotency_reused()
        return replayed_event(record, self._replay_epoch())

    async def _idem_record(self, user_id: str, key: str) -> bytes | None:
        """The record of idempotency key `key` of a write to `user_id`, if any."""
        raise NotImplementedError

    def _replay_epoch(self) -> str | None:
        return None


class RedisStore(RecordOps):
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
        replicas_ack: int = 0,
        replicas_ack_timeout: float = 1.0,
        where: str = "",
        tombstone_retention: float = 7 * 86_400.0,
        idempotency_window: float = 86_400.0,
    ) -> None:
        self.partitions = partitions
        # redis-py types every reply as a bytes/str union whatever decode_responses says; this
        # client never decodes, so replies are bytes and are treated as such.
        self._r: Any = client
        self._history_size = history_size
        self._history_max_age_ms = int(history_max_age * 1000)
        self._p = prefix
        self._write = client.register_script(_WRITE_LUA)
        self._read_position = client.register_script(_POSITION_LUA)
        self._rotate = client.register_script(_ROTATE_LUA)
        self._user_locks = KeyedLock()
        self._emails, self._ids = f"{prefix}:emails", f"{prefix}:ids"
        self._offsets, self._epoch = f"{prefix}:offsets", f"{prefix}:epoch"
        self._heads_key = f"{prefix}:heads"
        self._floors = f"{prefix}:floors"
        self._idem_window_ms = int(idempotency_window * 1000)
        self._retention_ms = int(tombstone_retention * 1000)
        self._read_state = client.register_script(STATE_LUA)
        self._config = f"{prefix}:config"
        self._replicas_ack, self._ack_timeout_ms = replicas_ack, int(replicas_ack_timeout * 1000)
        # What this process has seen of the history: its epoch, and per partition the last
        # offset and the tag of the write that made it. Writes refuse to land behind it.
        self._seen_epoch = ""
        self._heads: dict[int, tuple[int, str]] = {}
        # With Sentinel: the primary's address as last asked, and how often it moved.
        self._sentinel_pool = getattr(client, "connection_pool", None)
        if not isinstance(self._sentinel_pool, SentinelConnectionPool):
            self._sentinel_pool = None
        self._primary: tuple[str, int] | None = None
        self.switchovers = 0
        self.where = where  # named in every error message: which Redis failed

    def _failing(self, write: bool = False) -> contextlib.AbstractContextManager[None]:
        return _unavailable(write, self.where)

    async def _idem_record(self, user_id: str, key: str) -> bytes | None:
        name = f"{self._p}:idem:{key}"
        with self._failing():
            return cast(bytes | None, await _read_again(lambda: self._r.get(name)))

    async def state_since(
        self, partition: int, after_offset: int, cursor: int | None, limit: int
    ) -> StatePage | None:
        p = partition
        keys = [self._floors, f"{self._p}:chg:{p}", f"{self._p}:dead:{p}",
                f"{self._p}:tomb:{p}", self._epoch]
        start = after_offset if cursor is None else max(cursor, after_offset)
        with self._failing():
            reply = await _read_again(lambda: self._read_state(
                keys=keys, args=[p, after_offset, start, limit, f"{self._p}:user:"]))
        return state_page(reply, limit)

    @classmethod
    def from_url(cls, url: str, pool_size: int = 64, **kwargs: Any) -> RedisStore:
        # A blocking pool: a burst of store calls beyond pool_size waits for a connection
        # (up to the socket timeout) instead of failing at once, as redis-py's default pool
        # does past its limit, which callers would see as UNAVAILABLE.
        options: dict[str, Any] = dict(
            max_connections=pool_size, timeout=5,
            socket_connect_timeout=2, socket_timeout=5, health_check_interval=10,
            retry=no_retry(),
        )
        if url.startswith(("redis+sentinel://", "rediss+sentinel://")):
            sentinels, master, password, tls, db = parse_sentinel_url(url)
            manager = Sentinel(  # type: ignore[no-untyped-call]
                sentinels, socket_connect_timeout=2, socket_timeout=2,
                **({"ssl": True} if tls else {}))
            client = manager.master_for(
                master, connection_pool_class=_sentinel_pool_class(),
                password=password or None, db=db, ssl=tls, **options)
            where = f"Redis primary {master!r} via Sentinel " + ",".join(
                f"{h}:{p}" for h, p in sentinels)
            return cls(client, where=where, **kwargs)
        pool = aioredis.BlockingConnectionPool.from_url(url, **options)
        kw = pool.connection_kwargs
        where = (f"Redis at {kw['path']}" if "path" in kw
                 else f"Redis at {kw.get('host', 'localhost')}:{kw.get('port', 6379)}")
        return cls(aioredis.Redis.from_pool(pool), where=where, **kwargs)

    def _user_key(self, user_id: str) -> str:
        return f"{self._p}:user:{user_id}"

    def _log_key(self, partition: int) -> str:
        return f"{self._p}:log:{partition}"

    def _channel(self, partition: int) -> str:
        return f"{self._p}:ev:{partition}"

    # -- reads ----------------------------------------------------------------------------

    async def _read_record(self, user_id: str) -> bytes | None:
        key = self._user_key(user_id)
        with self._failing():
            return cast(bytes | None, await _read_again(lambda: self._r.hget(key, "d")))

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

        with self._failing():
            raws = await _read_again(read)
        # A user deleted between the two calls is skipped, as if listed a moment later.
        return [_user_from(msgpack.unpackb(raw)) for raw in raws if raw is not None]

    async def history_tagged(
        self, partition: int, after_offset: int, limit: int
    ) -> list[tuple[Event, str, str]]:
        """history(), each event with the tag of its write and the tag of the write before."""
        async def read() -> tuple[bytes | None, list[Any]]:
            return await self._r.get(self._epoch), await self._r.xrange(
                self._log_key(partition), min=f"{after_offset + 1}-0", max="+", count=limit
            )

        with self._failing():
            epoch, entries = await _read_again(read)
        return tagged_events(partition, epoch.decode() if epoch is not None else "", entries)

    async def position(self) -> Position:
        """The epoch ("" while none exists: a new or emptied Redis), each partition's last
        offset and the tag of its last write. Only reads (see _POSITION_LUA)."""
        with self._failing():
            epoch, offsets, heads = await _read_again(lambda: self._read_position(
                keys=[self._epoch, self._offsets, self._heads_key], args=[self.partitions]))
        position = Position(
            epoch.decode() if epoch else "", tuple(int(o or 0) for o in offsets),
            tuple(h.decode() if h else "" for h in heads))
        self._observe(position)
        return position

    def _observe(self, position: Position) -> None:
        """Learns what a read saw. Knowledge only moves forward: a history that went back is
        not adopted here, so the next write finds it and refuses to land on it."""
        if position.epoch != self._seen_epoch:
            if self._seen_epoch:
                return  # a moved epoch is taken up by the next write (verdict 1)
            self._seen_epoch = position.epoch
        for p, (offset, head) in enumerate(zip(position.offsets, position.tags, strict=True)):
            known = self._heads.get(p)
            if known is None or offset > known[0]:
                self._heads[p] = (offset, head)

    async def ensure_epoch(self) -> None:
        """Gives a new (or emptied) Redis its epoch at start-up, so the first subscribers and
        tokens have one before any write; later, writes create it if it goes missing."""
        with self._failing(write=True):
            await self._r.hsetnx(self._config, "partitions", self.partitions)
            made = int(await self._r.hget(self._config, "partitions"))
            if made != self.partitions:
                raise KeyspaceMismatch(keyspace_mismatch(self._p, made, self.partitions))
            await self._r.set(self._epoch, secrets.token_hex(4), nx=True)
            # Change tracking (resync by state) starts here for a keyspace that had none:
            # a resync from before it is refused. A new keyspace starts at 0.
            offsets = await self._r.hmget(self._offsets, list(range(self.partitions)))
            async with self._r.pipeline(transaction=False) as pipe:
                for p, offset in enumerate(offsets):
                    pipe.hsetnx(self._floors, p, int(offset or 0))
                await pipe.execute()

    async def rotate_epoch(self, seen: str) -> str:
        """Starts a new epoch if the current one is still `seen` (else returns the one another
        instance already started): the history was found replaced under the same offsets."""
        with self._failing(write=True):
            reply = await self._rotate(keys=[self._epoch], args=[seen, secrets.token_hex(4)])
        epoch = bytes(reply).decode()
        self._forget(epoch)
        return epoch

    def _forget(self, epoch: str) -> None:
        """A new epoch: what was known of the old history says nothing about this one."""
        self._seen_epoch = epoch
        self._heads.clear()

    async def eviction_policy(self) -> str | None:
        """Redis's maxmemory-policy, or None when CONFIG is not allowed (managed Redis)."""
        try:
            with self._failing():
                reply = await self._r.config_get("maxmemory-policy")
        except (redis_errors.ResponseError, StoreUnavailable):
            return None
        value = reply.get(b"maxmemory-policy", reply.get("maxmemory-policy"))
        return value.decode() if isinstance(value, bytes) else value

    # -- writes ---------------------------------------------------------------------------

    async def create_many(self, rows: Sequence[NewUser]) -> list[BulkResult]:
        ops = [
            _Op(EventType.CREATED, r.user, 0, "", email_key(r.user.email), r.password_hash,
                r.idempotency)
            for r in rows
        ]
        # Creates never race (they check existence in the script), so no _Raced comes back.
        return cast(list[BulkResult], await self._apply(ops))

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
             pack_event(op.type, op.user, ts), *op.idem_args()]
            for op, p in zip(ops, partitions, strict=True)
        ], use_bin_type=False)
        touched = sorted(set(partitions))
        for _ in range(_WRITE_TRIES):
            tag = secrets.token_hex(4)
            # What this try tells the script, kept: another write of this process may forget
            # the heads (a new epoch) while this one waits for its reply.
            sent = {p: self._heads[p] for p in touched if p in self._heads}
            known = msgpack.packb([[p, *head] for p, head in sent.items()], use_bin_type=False)
            reply = await self._run_write(tag, packed, known, ts)
            epoch = reply[0].decode() if reply[0] else ""
            verdict = reply[1]
            if verdict == _APPLIED:
                break
            if verdict == _EPOCH_MOVED:
                # Another instance started a new epoch (or Redis lost it): write there.
                self._forget(epoch)
                continue
            partition, here = reply[2], reply[3]
            log.error(
                "the Redis history went back: partition %d is at offset %d, this process had"
                " seen %d (a replica promoted before it had every write, or a Redis restarted"
                " from older data); acknowledged writes after it are lost; starting a new"
                " epoch so every subscriber is told", partition, here, sent[partition][0])
            self._forget(await self.rotate_epoch(epoch))
        else:
            raise StoreUnavailable("the event history kept changing under this write; nothing"
                                   " was written")
        self._seen_epoch = epoch
        out: list[BulkResult | _Raced] = []
        for i, (op, p) in enumerate(zip(ops, partitions, strict=True)):
            status, value = reply[2 + 2 * i], reply[3 + 2 * i]
            if status == _OK:
                known_head = self._heads.get(p)
                if known_head is None or value > known_head[0]:
                    self._heads[p] = (value, tag)
            out.append(out[value - 1] if status == _SAME_AS
                       else _result(status, value, op, p, epoch, ts))
        return out

    async def _run_write(self, tag: str, packed: bytes, known: bytes, ts: int) -> Any:
        keys = [self._emails, self._ids, self._offsets, self._epoch, self._heads_key,
                self._floors]
        args: list[Any] = [secrets.token_hex(4), self._history_size, f"{self._p}:", ts // 1000,
                self._history_max_age_ms, packed, tag, self._seen_epoch, known,
                self._idem_window_ms, self._retention_ms]
        with self._failing(write=True):
            if not self._replicas_ack:
                return await self._write(keys=keys, args=args)
            # WAIT counts the replicas that have this connection's writes, so it must follow
            # the script on the same connection: one pipeline.
            async with self._r.pipeline(transaction=False) as pipe:
                await self._write(keys=keys, args=args, client=pipe)
                pipe.wait(self._replicas_ack, self._ack_timeout_ms)
                reply, acked = await pipe.execute()
        if reply[1] == _APPLIED and acked < self._replicas_ack:
            raise too_few_replicas(acked, self._replicas_ack, self._ack_timeout_ms, "primary")
        return reply

    # -- events ---------------------------------------------------------------------------

    @asynccontextmanager
    async def listen(self) -> AsyncIterator[AsyncIterator[EventBatch]]:
        pubsub = self._r.pubsub(ignore_subscribe_messages=True)
        channels = [self._channel(p) for p in range(self.partitions)]
        try:
            with self._failing():
                await pubsub.subscribe(*channels)
                # Wait for every confirmation: from here on, no published event is missed.
                confirmed = 0
                while confirmed < len(channels):
                    message = await pubsub.parse_response(block=True, timeout=5)
                    if message is None:
                        raise StoreUnavailable("pub/sub subscription was not confirmed")
                    confirmed += message[0] in (b"subscribe", "subscribe")

            switchovers = self.switchovers

            async def batches() -> AsyncIterator[EventBatch]:
                task = asyncio.current_task()
                while True:
                    with self._failing():
                        # Not a blocking read: an idle subscription still looks up once a
                        # second whether Sentinel moved the primary away from its node.
                        message = await pubsub.get_message(timeout=1.0)
                    if task is not None and task.cancelling():
                        # redis-py's blocking read can return None where it was cancelled
                        # (seen: shutdown hung on a listener that went back to waiting).
                        raise asyncio.CancelledError
                    if self.switchovers != switchovers:
                        raise StoreUnavailable("Sentinel moved the primary: subscribing on the"
                                               " new one")
                    if message is not None and message["type"] == "message":
                        yield decode_batch(message["data"])

            yield batches()
        finally:
            await pubsub.aclose()

    async def ping(self) -> None:
        """Answers when Redis can serve hub: reachable, loaded, and a primary (a replica
        refuses every write, so hub is not ready on one). With Sentinel, also asks who the
        primary is (see _follow_primary)."""
        if self._sentinel_pool is not None:
            await self._follow_primary(self._sentinel_pool)
        try:
            with self._failing():
                role = await self._r.execute_command("ROLE")
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, redis_errors.NoPermissionError):
                raise
            # An ACL user without ROLE: a plain PING still says whether Redis answers.
            with self._failing():
                await self._r.ping()
            return
        kind = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
        if kind != "master":
            raise StoreUnavailable(
                f"the user store is a read-only {kind}, not a primary: point --redis-url at"
                " the primary (or use redis+sentinel://)")

    async def _follow_primary(self, pool: SentinelConnectionPool) -> None:
        """Sentinel can promote a replica while the old primary still answers as one (a
        pause longer than down-after-milliseconds): connections already open would go on
        reading and writing there. Asking every second moves idle connections at once (the
        pool drops them when the address changes) and counts the switch-over, which ends the
        pub/sub subscription and makes the fan-out start a new epoch (writes the old primary
        took may be missing from the new one, and reads may have shown them)."""
        with self._failing():
            primary = await pool.get_master_address()  # type: ignore[no-untyped-call]
        if self._primary is not None and primary != self._primary:
            log.warning("Sentinel moved the Redis primary from %s:%d to %s:%d",
                        *self._primary, *primary)
            self.switchovers += 1
        self._primary = primary

    async def aclose(self) -> None:
        await self._r.aclose()


class _Op:
    __slots__ = ("expected", "idem", "new_email", "old_email", "pw_hash", "type", "user")

    def __init__(
        self, type_: EventType, user: User, expected: int,
        old_email: str, new_email: str, pw_hash: str | None,
        idem: Idempotency | None = None,
    ) -> None:
        self.type, self.user, self.expected = type_, user, expected
        self.old_email, self.new_email, self.pw_hash = old_email, new_email, pw_hash
        self.idem = idem

    def idem_args(self) -> tuple[str, str]:
        """The op's idempotency key name and fingerprint, as the scripts take them."""
        return (self.idem.key, self.idem.fingerprint) if self.idem else ("", "")

    def record(self) -> bytes:
        return msgpack.packb([*_user_fields(self.user), self.pw_hash])


class _Raced:
    """The stored version moved between our read and our write."""

    def __init__(self, stored: int) -> None:
        self.stored = stored


def replayed_event(record: bytes, epoch: str | None = None) -> Event:
    """The event of the write an idempotency key record (see write.lua) was kept for, with
    its epoch (or `epoch`: the cluster's digest)."""
    _, partition, offset, kept_epoch, packed = msgpack.unpackb(record, raw=True)
    type_, fields, ts = msgpack.unpackb(packed)
    shown = kept_epoch.decode() if epoch is None else epoch
    return Event(EventType(type_), _user_from(fields), partition, offset, shown, ts)


def _result(
    status: int, value: Any, op: _Op, partition: int, epoch: str, ts: int,
    replay_epoch: str | None = None,
) -> BulkResult | _Raced:
    """An op's outcome from its script status and value. A replayed op's event is shown with
    the epoch its key kept, or `replay_epoch` (the cluster's digest)."""
    if status == _OK:
        return Event(op.type, op.user, partition, value, epoch, ts)
    if status == _REPLAYED:
        return replayed_event(value, replay_epoch)
    if status == _KEY_REUSED:
        return idempotency_reused()
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
