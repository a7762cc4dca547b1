"""The Redis Cluster store: hub's data spread over the masters by partition, each write ONE
atomic Lua call on the node that owns its partition, events on sharded pub/sub.

Keys (prefix `hub`; `{t}` is partition p's hash tag, chosen so the partitions' slots are
evenly spaced over 0..16383, hence spread evenly over masters that own equal slot ranges):
    {prefix}:{t}:u:{id}  hash   v=version, d=msgpack record, e=the email's index form
    {prefix}:{t}:ids     zset   the partition's ids, score 0 (ListUsers merges them)
    {prefix}:{t}:meta    hash   e=the partition's epoch, o=last offset, h=tag of the last write,
                                f=the offset up to which tombstones may have been dropped
    {prefix}:{t}:chg     zset   id -> offset of its last create or update (resync by state)
    {prefix}:{t}:dead    zset   deleted id -> offset of its deletion (resync by state)
    {prefix}:{t}:tomb    hash   deleted id -> its deletion event (kept --tombstone-retention)
    {prefix}:{t}:idem:{key} string  an idempotency key's write (see partition.lua); t is the
                                partition of the user written (a create's id is made there)
    {prefix}:{t}:log     stream the partition's history (as hub:log:{p} in redis.py)
    {prefix}:{t}:fences  zset   reservation tokens taken over from a stale writer (see below)
    {prefix}:{t}:emails  hash   the email index, sharded by the email's own hash into
                                buckets that reuse the partitions' tags (bucket = crc32 of
                                the email's index form mod partitions): field the email,
                                value "state|time ms|reservation token|id", state p
                                (pending) or c (confirmed)
    {prefix}:{config}    hash   partitions: the partition count the keyspace was made with
Shard channel {prefix}:{t}:ev carries each write's events (see partition.lua).

Email uniqueness across slots is a reservation protocol, because the email's slot and the
user's are different nodes and no one call can hold both:
1. reserve: the email's entry is created pending (id, token, time) if absent;
2. write: the user's partition call carries the token, and refuses a fenced one;
3. confirm: the entry becomes confirmed. Deletes and email changes release the old entry.
A writer that finds the email held checks the holder in the holder's own partition, in one
atomic call: if the holder's record has that email, the email is taken; if not (the holder
crashed between the steps, or moved or deleted its email and crashed before releasing), that
call also fences the holder's token, so the holder's write, if it is still on its way, is
refused, and the entry is taken over with a compare-and-set. A pending entry younger than
_PENDING_GRACE is respected as taken (a concurrent create in flight). So two creates of one
email never both succeed, and a crash between the steps neither locks the email for longer
than the grace nor leaves a user without its event (user and event are one call).

Epochs are per partition (a failover replaces one master's partitions, not the others'); the
epoch hub shows (tokens, batches, Position.epoch) is a digest of all of them, so a change in
any partition is an epoch change for every subscriber, as on one node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import logging
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any, cast

import msgpack
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from hub.domain import (
    Event,
    EventBatch,
    EventType,
    NewUser,
    Position,
    StatePage,
    User,
    email_key,
    now_us,
    partition_of,
)
from hub.errors import (
    AlreadyExists,
    Contention,
    HubError,
    KeyspaceMismatch,
    StoreUnavailable,
    VersionConflict,
)
from hub.store.base import BulkResult, idempotency_reused
from hub.store.locks import KeyedLock
from hub.store.redis import (
    _CAS_ATTEMPTS,
    _SAME_AS,
    STATE_LUA,
    RecordOps,
    _Op,
    _Raced,
    _read_again,
    _result,
    _unavailable,
    _user_from,
    decode_batch,
    keyspace_mismatch,
    no_retry,
    pack_event,
    replayed_event,
    state_page,
    tagged_events,
    too_few_replicas,
)

log = logging.getLogger(__name__)

# partition.lua's KEYS before the ops' own (meta, ids, log, fences, chg, dead, tomb).
_FIXED_KEYS = 7

_PARTITION_LUA = files("hub.store").joinpath("partition.lua").read_text()
# The email index, one hash per bucket (field: the email's index form, value:
# "state|time ms|token|id", state p pending / c confirmed). Each takes its ops as one msgpack
# argument, in order, so a bulk batch costs one call per bucket, not one per row.
# Reserve: [email, id, token, stale id, stale token]: the entry becomes this caller's pending
# one if absent, or if it is still exactly the stale one the caller checked. Reply per op:
# {0}, or {1, id, token, state, time} of the holder.
_RESERVE_LUA = """#!lua
local out = {}
for _, op in ipairs(cmsgpack.unpack(ARGV[1])) do
  local st, ts, tok, id = nil, nil, nil, nil
  local cur = redis.call('HGET', KEYS[1], op[1])
  if cur then st, ts, tok, id = string.match(cur, '^(%a)|(%d+)|(%x+)|(.+)$') end
  if not cur or (op[4] ~= '' and id == op[4] and tok == op[5]) then
    redis.call('HSET', KEYS[1], op[1], 'p|' .. ARGV[2] .. '|' .. op[3] .. '|' .. op[2])
    out[#out + 1] = {0}
  else
    out[#out + 1] = {1, id, tok, st, ts}
  end
end
return out
"""
# Confirm: [email, id, token]: a pending entry of that id and token becomes confirmed.
_CONFIRM_LUA = """#!lua
for _, op in ipairs(cmsgpack.unpack(ARGV[1])) do
  local cur = redis.call('HGET', KEYS[1], op[1])
  if cur then
    local _, ts, tok, id = string.match(cur, '^(%a)|(%d+)|(%x+)|(.+)$')
    if id == op[2] and tok == op[3] then
      redis.call('HSET', KEYS[1], op[1], 'c|' .. ts .. '|' .. tok .. '|' .. id)
    end
  end
end
return 0
"""
# Release: [email, id, token]: the entry goes if that id holds it, with that token, or
# confirmed (token ""); never someone's pending reservation made since.
_RELEASE_LUA = """#!lua
for _, op in ipairs(cmsgpack.unpack(ARGV[1])) do
  local cur = redis.call('HGET', KEYS[1], op[1])
  if cur then
    local st, _, tok, id = string.match(cur, '^(%a)|(%d+)|(%x+)|(.+)$')
    if id == op[2] and (tok == op[3] or (op[3] == '' and st == 'c')) then
      redis.call('HDEL', KEYS[1], op[1])
    end
  end
end
return 0
"""
# In the holder's partition: 1 if the holder's record has the email (it is taken), else the
# holder's token is fenced (its write, if still on its way, is refused) and 0.
_CHECK_HOLDER_LUA = """#!lua
if redis.call('HGET', KEYS[1], 'e') == ARGV[1] then return 1 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return 0
"""
_POSITION_LUA = """#!lua flags=no-writes
return redis.call('HMGET', KEYS[1], 'e', 'o', 'h')
"""
_ROTATE_LUA = """#!lua
local current = redis.call('HGET', KEYS[1], 'e')
if current == ARGV[1] or not current then
  redis.call('HSET', KEYS[1], 'e', ARGV[2])
  return ARGV[2]
end
return current
"""
_APPLIED, _EPOCH_MOVED, _DIVERGED = range(3)
_OK, _RESERVATION_LOST = 0, 5
_WRITE_TRIES = 4
# A pending reservation younger than this is a write in flight: its email is taken. Older, it
# is checked and, if its writer never landed, taken over. A reservation is valid for its
# writer for _RESERVATION_VALIDITY (partition.lua refuses it after), so a writer stalled past
# it can never land after its email was taken over.
_PENDING_GRACE_MS = 5_000
_RESERVATION_VALIDITY_MS = 60_000
_TYPE_CODE = {EventType.CREATED: "c", EventType.UPDATED: "u", EventType.DELETED: "d"}


def partition_tags(partitions: int) -> list[str]:
    """For each partition, a short hash tag whose slot lies in the partition's even share
    of the slot range: the partitions spread over the masters as evenly as their slots."""
    tags = []
    for p in range(partitions):
        low = p * REDIS_CLUSTER_HASH_SLOTS // partitions
        high = (p + 1) * REDIS_CLUSTER_HASH_SLOTS // partitions
        k = 0
        while not low <= key_slot(f"p{p}.{k}".encode()) < high:
            k += 1
        tags.append(f"p{p}.{k}")
    return tags


def epoch_digest(epochs: Sequence[str]) -> str:
    """The one epoch hub shows for the partitions' epochs ("" while none has one)."""
    if not any(epochs):
        return ""
    return hashlib.sha1("|".join(epochs).encode()).hexdigest()[:12]


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str, str, bool]:
    """`redis+cluster://[user:password@]host:port[,host:port...]` (rediss+ for TLS) ->
    (seed nodes, user, password, tls)."""
    scheme, _, rest = url.partition("://")
    if scheme not in ("redis+cluster", "rediss+cluster") or not rest:
        raise ValueError(f"not a redis+cluster:// URL: {scheme}://...")
    auth, _, rest = rest.rpartition("@")
    user, _, password = auth.partition(":") if auth else ("", "", "")
    hosts = rest.split("/", 1)[0]
    nodes = []
    for host in hosts.split(","):
        name, _, port = host.strip().rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"cluster node address {host!r} is not host:port")
        nodes.append((name.strip("[]"), int(port)))
    return nodes, user, password, scheme == "rediss+cluster"


@contextlib.contextmanager
def _cluster_failing(write: bool, where: str) -> Iterator[None]:
    """_unavailable, plus the cluster's own failures (no node for a slot, the cluster down,
    redirections that did not settle): all of them "not now", never a bug."""
    with _unavailable(write, where):
        try:
            yield
        except (redis_errors.MovedError, redis_errors.AskError) as exc:
            # Only where hub talks to one node itself (its pub/sub, replicas-ack writes):
            # the cluster client follows redirections on its own.
            raise StoreUnavailable(
                f"the user store ({where}) moved a slot under this call ({exc})"
                + ("; nothing was written" if write else "")) from exc
        except (redis_errors.ClusterError, redis_errors.SlotNotCoveredError,
                redis_errors.RedisClusterException) as exc:
            if isinstance(exc, redis_errors.ResponseError):
                raise  # CLUSTERDOWN, TRYAGAIN, ...: _unavailable words them
            raise StoreUnavailable(
                f"the user store ({where}) cannot serve this slot now ({exc})"
                + ("; nothing was written" if write else "")) from exc


class ClusterStore(RecordOps):
    """Usage:

        store = ClusterStore.from_url("redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    """

    def __init__(
        self,
        client: RedisCluster,
        partitions: int = 128,
        history_size: int = 10_000,
        prefix: str = "hub",
        history_max_age: float = 86_400.0,
        node_options: dict[str, Any] | None = None,
        where: str = "Redis Cluster",
        pool_size: int = 64,
        replicas_ack: int = 0,
        replicas_ack_timeout: float = 1.0,
        tombstone_retention: float = 7 * 86_400.0,
        idempotency_window: float = 86_400.0,
    ) -> None:
        self.partitions = partitions
        self.switchovers = 0
        self.where = where
        self._r: Any = client
        self._node_options = node_options or {}
        self._history_size = history_size
        self._history_max_age_ms = int(history_max_age * 1000)
        self._p = prefix
        tags = partition_tags(partitions)
        self._meta = [f"{prefix}:{{{t}}}:meta" for t in tags]
        self._ids = [f"{prefix}:{{{t}}}:ids" for t in tags]
        self._log = [f"{prefix}:{{{t}}}:log" for t in tags]
        self._fences = [f"{prefix}:{{{t}}}:fences" for t in tags]
        self._changes = [f"{prefix}:{{{t}}}:chg" for t in tags]
        self._deaths = [f"{prefix}:{{{t}}}:dead" for t in tags]
        self._tombs = [f"{prefix}:{{{t}}}:tomb" for t in tags]
        self._idem = [f"{prefix}:{{{t}}}:idem:" for t in tags]
        self._idem_window_ms = int(idempotency_window * 1000)
        self._retention_ms = int(tombstone_retention * 1000)
        self._read_state = client.register_script(STATE_LUA)
        self._channels = [f"{prefix}:{{{t}}}:ev" for t in tags]
        self._partition_of_channel = {c.encode(): p for p, c in enumerate(self._channels)}
        self._user_prefix = [f"{prefix}:{{{t}}}:u:" for t in tags]
        self._email_buckets = [f"{prefix}:{{{t}}}:emails" for t in tags]
        self._config = f"{prefix}:{{config}}"
        self._write = client.register_script(_PARTITION_LUA)
        self._reserve = client.register_script(_RESERVE_LUA)
        self._confirm = client.register_script(_CONFIRM_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._check_holder = client.register_script(_CHECK_HOLDER_LUA)
        self._read_meta = client.register_script(_POSITION_LUA)
        self._rotate = client.register_script(_ROTATE_LUA)
        self._user_locks = KeyedLock()
        self._free = asyncio.Semaphore(pool_size)
        self._pool_size = pool_size
        self._replicas_ack, self._ack_timeout_ms = replicas_ack, int(replicas_ack_timeout * 1000)
        self._nodes: dict[tuple[str, int], tuple[aioredis.Redis, Any]] = {}
        # Per partition: its epoch and the last offset and tag this process has seen.
        self._epochs = [""] * partitions
        self._digest = ""  # epoch_digest(self._epochs), kept by _take_epoch
        self._heads: dict[int, tuple[int, str]] = {}
        # The listener's view, for the audit of silent subscriptions (see position()).
        self._live = [0] * partitions
        self._suspects: dict[int, tuple[int, int]] = {}
        self._resubscribe = ""
        self._ensured = False

    @classmethod
    def from_url(cls, url: str, pool_size: int = 64, **kwargs: Any) -> ClusterStore:
        nodes, user, password, tls = parse_cluster_url(url)
        options: dict[str, Any] = dict(
            socket_connect_timeout=2, socket_timeout=5, health_check_interval=10,
            username=user or None, password=password or None, ssl=tls, retry=no_retry())
        # No retries of its own (see no_retry): redirections (MOVED, ASK) and TRYAGAIN,
        # which ran nothing, it still follows.
        client = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes],
            max_connections=pool_size, **options)
        where = "Redis Cluster at " + ",".join(f"{h}:{p}" for h, p in nodes)
        return cls(client, node_options=options, where=where, pool_size=pool_size, **kwargs)

    @asynccontextmanager
    async def _calling(self, write: bool = False) -> AsyncIterator[None]:
        """Around every Redis call: its failures as hub's errors, and a wait for a free
        connection (redis-py's cluster pool fails past its size instead of waiting, and a
        bulk batch fans out to many calls at once)."""
        async with self._free:
            with _cluster_failing(write, self.where):
                yield

    def _user_key(self, user_id: str) -> str:
        return self._user_prefix[partition_of(user_id, self.partitions)] + user_id

    def _emails(self, key: str) -> str:
        """The email index bucket of an email (its index form): by the email's own hash,
        over the partitions' hash tags, so the buckets spread like the partitions."""
        return self._email_buckets[zlib.crc32(key.encode()) % self.partitions]

    def _take_epoch(self, p: int, epoch: str) -> None:
        """Partition p's epoch is `epoch` now. The digest is kept, not computed per batch:
        every live batch and history read is shown with it."""
        if epoch != self._epochs[p]:
            self._epochs[p] = epoch
            self._digest = epoch_digest(self._epochs)

    # -- reads ----------------------------------------------------------------------------

    async def _read_record(self, user_id: str) -> bytes | None:
        key = self._user_key(user_id)
        async with self._calling():
            return cast(bytes | None, await _read_again(lambda: self._r.hget(key, "d")))

    async def _idem_record(self, user_id: str, key: str) -> bytes | None:
        name = self._idem[partition_of(user_id, self.partitions)] + key
        async with self._calling():
            return cast(bytes | None, await _read_again(lambda: self._r.get(name)))

    def _replay_epoch(self) -> str | None:
        return self._digest

    async def state_since(
        self, partition: int, after_offset: int, cursor: int | None, limit: int
    ) -> StatePage | None:
        p = partition
        keys = [self._meta[p], self._changes[p], self._deaths[p], self._tombs[p], self._meta[p]]
        start = after_offset if cursor is None else max(cursor, after_offset)
        async with self._calling():
            reply = await _read_again(lambda: self._read_state(
                keys=keys, args=[p, after_offset, start, limit, self._user_prefix[p],
                                 "cluster"]))
        if reply is None:
            return None
        # Shown with the digest while the partition is at the epoch this process follows;
        # a partition at another shows that one (a page of another history, never taken
        # for this one).
        kept = reply[0].decode() if reply[0] else ""
        return state_page(reply, limit, self._digest if kept == self._epochs[p] else kept)

    async def list_after(self, after_id: str, limit: int) -> list[User]:
        """A k-way merge of the partitions' id indexes: `limit` ids from each (memory: page
        size times partitions), the first `limit` of their union in id order."""
        start = f"({after_id}" if after_id else "-"

        async def read() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for key in self._ids:
                    pipe.zrange(key, start, "+", bylex=True, offset=0, num=limit)
                pages = await pipe.execute()
            ids = [i.decode() for i in itertools.islice(heapq.merge(*pages), limit)]
            if not ids:
                return []
            async with self._r.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.hget(self._user_key(i), "d")
                return cast(list[Any], await pipe.execute())

        async with self._calling():
            raws = await _read_again(read)
        return [_user_from(msgpack.unpackb(raw)) for raw in raws if raw is not None]

    async def history_tagged(
        self, partition: int, after_offset: int, limit: int
    ) -> list[tuple[Event, str, str]]:
        async def read() -> tuple[Any, Any]:
            return await self._read_meta(keys=[self._meta[partition]]), await self._r.xrange(
                self._log[partition], min=f"{after_offset + 1}-0", max="+", count=limit)

        async with self._calling():
            meta, entries = await _read_again(read)
        return tagged_events(
            partition, self._shown_epoch(partition, meta[0].decode() if meta[0] else ""), entries)

    def _shown_epoch(self, partition: int, epoch: str) -> str:
        """The epoch an event of `partition` is shown with: the digest, while its partition's
        epoch is the one this process knows; otherwise that other epoch, which no digest
        equals, so the fan-out reads the position again and finds the change."""
        return self._digest if epoch == self._epochs[partition] else f"p{partition}:{epoch}"

    async def position(self) -> Position:
        async def read() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for key in self._meta:
                    pipe.hmget(key, "e", "o", "h")
                return cast(list[Any], await pipe.execute())

        async with self._calling():
            metas = await _read_again(read)
        epochs = tuple(m[0].decode() if m[0] else "" for m in metas)
        offsets = tuple(int(m[1] or 0) for m in metas)
        tags = tuple(m[2].decode() if m[2] else "" for m in metas)
        for p in range(self.partitions):
            if epochs[p] and epochs[p] != self._epochs[p]:
                # Another instance started a new epoch here (or this is a new keyspace): take
                # it up now, as a write would on verdict 1, so the batches of this partition
                # are shown with the digest the fan-out reads here. What was seen of the old
                # history says nothing about the new one.
                self._take_epoch(p, epochs[p])
                self._heads.pop(p, None)
            if epochs[p] == self._epochs[p]:
                known = self._heads.get(p)
                if known is None or offsets[p] > known[0]:
                    self._heads[p] = (offsets[p], tags[p])
        self._audit_subscription(offsets)
        return Position(epoch_digest(epochs), offsets, tags)

    def _audit_subscription(self, offsets: Sequence[int]) -> None:
        """A sharded subscription can die silently (a slot moved, a library losing track of
        it): a partition whose offset had passed what the listener got one audit ago, while
        the listener got nothing of it since, is not arriving. The listener resubscribes; the
        fan-out's audit repairs the gap from history meanwhile."""
        for p, offset in enumerate(offsets):
            suspect = self._suspects.pop(p, None)
            if offset <= self._live[p]:
                continue
            if suspect is not None and suspect[1] == self._live[p] and suspect[0] > suspect[1]:
                self._resubscribe = (f"events of partition {p} stopped arriving (offset"
                                     f" {offset} in Redis, {self._live[p]} received)")
            self._suspects[p] = (offset, self._live[p])

    async def ensure_epoch(self) -> None:
        """Checks the keyspace's partition count and gives every partition without one an
        epoch, the same for all of them: partitions that got theirs one by one from their
        first writes would change the digest each time. Also run before this process's
        first write, in case Redis was down at start-up."""
        self._ensured = True
        async with self._calling(write=True):
            await self._r.hsetnx(self._config, "partitions", self.partitions)
            made = int(await self._r.hget(self._config, "partitions"))
            if made != self.partitions:
                raise KeyspaceMismatch(keyspace_mismatch(self._p, made, self.partitions))
            epoch = secrets.token_hex(4)
            async with self._r.pipeline(transaction=False) as pipe:
                for key in self._meta:
                    pipe.hsetnx(key, "e", epoch)
                await pipe.execute()
            # Change tracking (resync by state) starts here for a keyspace that had none.
            async with self._r.pipeline(transaction=False) as pipe:
                for key in self._meta:
                    pipe.hget(key, "o")
                offsets = await pipe.execute()
            async with self._r.pipeline(transaction=False) as pipe:
                for key, offset in zip(self._meta, offsets, strict=True):
                    pipe.hsetnx(key, "f", int(offset or 0))
                await pipe.execute()
        await self.position()  # every partition's epoch, for the digest

    async def rotate_epoch(self, seen: str) -> str:
        """A new epoch if the digest is still `seen`. One partition's compare-and-set is
        enough to change the digest, and is atomic: instances that ask at once agree."""
        current = await self.position()
        if current.epoch == seen:
            await self._rotate_partition(0, self._epochs[0])
            current = await self.position()
        return current.epoch

    async def _rotate_partition(self, p: int, seen: str) -> None:
        async with self._calling(write=True):
            reply = await self._rotate(keys=[self._meta[p]], args=[seen, secrets.token_hex(4)])
        self._take_epoch(p, bytes(reply).decode())
        self._heads.pop(p, None)

    async def eviction_policy(self) -> str | None:
        try:
            async with self._calling():
                replies = await self._r.config_get(
                    "maxmemory-policy", target_nodes=RedisCluster.PRIMARIES)
        except (redis_errors.ResponseError, StoreUnavailable):
            return None
        values = replies.values() if isinstance(replies, dict) and all(
            isinstance(v, dict) for v in replies.values()) else [replies]
        for reply in values:
            value = reply.get(b"maxmemory-policy", reply.get("maxmemory-policy"))
            value = value.decode() if isinstance(value, bytes) else value
            if value != "noeviction":
                return cast(str, value)
        return "noeviction"

    # -- emails ---------------------------------------------------------------------------

    async def _pipelined(self, script: Any, calls: Sequence[tuple[list[str], list[Any]]]
                         ) -> list[Any]:
        """One script over many keys in one round trip per master (a bulk batch's emails),
        each reply or its error in call order. A master that lacks the script (a replica
        promoted since it was loaded) gets it, and its calls go again: NOSCRIPT ran nothing."""
        out: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            async with self._calling(write=True), self._r.pipeline(transaction=False) as pipe:
                for i in todo:
                    keys, args = calls[i]
                    # execute_command: redis-py blocks its evalsha() in cluster pipelines,
                    # though the command routes by its keys like any other.
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
            missing = []
            for i, reply in zip(todo, replies, strict=True):
                if isinstance(reply, redis_errors.NoScriptError) and not attempt:
                    missing.append(i)
                else:
                    out[i] = reply
            if not missing:
                break
            async with self._calling(write=True):
                await self._r.script_load(script.script)
            todo = missing
        return out

    async def _reserve_many(self, rows: Sequence[NewUser]) -> list[Any]:
        """Each row's email reserved, one call per bucket, all in one pipeline: (token,
        time), or the error that refused it. Rows whose email is held go through
        _take_email's checks one by one."""
        now = int(time.time() * 1000)
        tokens = [secrets.token_hex(8) for _ in rows]
        keys = [email_key(r.user.email) for r in rows]
        replies = await self._by_bucket(self._reserve, [
            (k, [k, r.user.id, t, "", ""]) for k, r, t in zip(keys, rows, tokens, strict=True)],
            now)
        out: list[Any] = []
        held = []
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):
                out.append(self._refusal(reply))
            elif reply[0] == 0:
                out.append((tokens[i], now))
            else:
                out.append(None)
                held.append(i)
        checked = await asyncio.gather(
            *(self._take_email(keys[i], rows[i].user.id) for i in held), return_exceptions=True)
        for i, result in zip(held, checked, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, HubError):
                raise result
            out[i] = result
        return out

    async def _by_bucket(self, script: Any, ops: Sequence[tuple[str, list[Any]]],
                         *args: Any) -> list[Any]:
        """`script` over the ops [(email, op)], one call per email bucket (ops in order
        within it), all in one pipeline; per op its reply, or its call's error."""
        buckets: dict[str, list[int]] = {}
        for i, (key, _) in enumerate(ops):
            buckets.setdefault(self._emails(key), []).append(i)
        calls = [([bucket], [msgpack.packb([ops[i][1] for i in indexes]), *args])
                 for bucket, indexes in buckets.items()]
        replies = await self._pipelined(script, calls)
        out: list[Any] = [None] * len(ops)
        for indexes, reply in zip(buckets.values(), replies, strict=True):
            for n, i in enumerate(indexes):
                out[i] = reply if isinstance(reply, Exception) or not isinstance(
                    reply, list) else reply[n]
        return out

    def _refusal(self, exc: Exception) -> HubError:
        """What a Redis error in a pipeline's reply means to the row it refused."""
        try:
            with _cluster_failing(True, self.where):
                raise exc
        except HubError as refusal:
            return refusal

    async def _take_email(self, key: str, user_id: str) -> tuple[str, int]:
        """Reserves the email for `user_id`: (token, time ms), or AlreadyExists."""
        stale_id, stale_tok = "", ""
        for _ in range(_CAS_ATTEMPTS):
            token, now = secrets.token_hex(8), int(time.time() * 1000)
            async with self._calling(write=True):
                (reply,) = await self._reserve(keys=[self._emails(key)], args=[
                    msgpack.packb([[key, user_id, token, stale_id, stale_tok]]), now])
            if reply[0] == 0:
                return token, now
            holder, holder_tok = reply[1].decode(), reply[2].decode()
            pending, since = reply[3] == b"p", int(reply[4] or 0)
            if holder != user_id:
                if pending and now - since < _PENDING_GRACE_MS:
                    raise AlreadyExists("email", "email is being registered by another"
                                                 " request")
                p = partition_of(holder, self.partitions)
                async with self._calling(write=True):
                    live = await self._check_holder(
                        keys=[self._user_prefix[p] + holder, self._fences[p]],
                        args=[key, holder_tok, now])
                if live:
                    if pending:
                        with contextlib.suppress(StoreUnavailable):
                            await self._confirm_email(key, holder, holder_tok)
                    raise AlreadyExists("email", "email is already registered")
            stale_id, stale_tok = holder, holder_tok  # take it over, if it is still that
        raise StoreUnavailable("the email's reservation kept changing; nothing was written")

    async def _confirm_email(self, key: str, user_id: str, token: str) -> None:
        async with self._calling(write=True):
            await self._confirm(keys=[self._emails(key)],
                                args=[msgpack.packb([[key, user_id, token]])])

    async def _release_email(self, key: str, user_id: str, token: str = "") -> None:
        """Best effort: an entry left behind is found stale and taken over by its next
        writer (see the module's docstring)."""
        with contextlib.suppress(StoreUnavailable):
            async with self._calling(write=True):
                await self._release(keys=[self._emails(key)],
                                    args=[msgpack.packb([[key, user_id, token]])])

    # -- writes ---------------------------------------------------------------------------

    async def create_many(self, rows: Sequence[NewUser]) -> list[BulkResult]:
        """Rows in rounds: a round holds each email's first remaining row (a later row of the
        same email waits for the earlier's outcome, so the earlier wins, as on one node).
        A round reserves its emails at once, writes with one call per partition, all at
        once, then confirms. A row whose reservation was taken over on its way goes again."""
        out: list[BulkResult | None] = [None] * len(rows)
        # Rows whose idempotency key is known are answered before any email is reserved (the
        # email is the first write's now: reserving it would say "taken").
        pending = []
        # A later row with an earlier row's key gets the earlier's outcome (or is refused).
        first_of: dict[str, int] = {}
        same_as: dict[int, int] = {}
        for i, replay in enumerate(await self._replays(rows)):
            idem = rows[i].idempotency
            if replay is not None:
                out[i] = replay
            elif idem is not None and idem.key in first_of:
                earlier = first_of[idem.key]
                if rows[earlier].idempotency == idem:
                    same_as[i] = earlier
                else:
                    out[i] = idempotency_reused()
            else:
                if idem is not None:
                    first_of[idem.key] = i
                pending.append(i)
        tries = dict.fromkeys(pending, 0)
        while pending:
            seen: set[str] = set()
            this_round: list[int] = []
            later: list[int] = []
            for i in pending:
                key = email_key(rows[i].user.email)
                (later if key in seen else this_round).append(i)
                seen.add(key)
            reserved = await self._reserve_many([rows[i] for i in this_round])
            go: list[int] = []
            for i, reservation in zip(this_round, reserved, strict=True):
                if isinstance(reservation, HubError):
                    out[i] = reservation
                elif isinstance(reservation, BaseException):
                    raise reservation
                else:
                    go.append(i)
            tokens = {i: r for i, r in zip(this_round, reserved, strict=True) if i in go}
            ops = [_Op(EventType.CREATED, rows[i].user, 0, "", email_key(rows[i].user.email),
                       rows[i].password_hash, rows[i].idempotency) for i in go]
            # A partition that failed gives its rows its error (their reservations stay
            # pending: each is found stale and taken over later); the others' rows landed.
            results = await self._apply(ops, [cast(tuple[str, int], tokens[i]) for i in go])
            confirm: list[tuple[str, list[Any]]] = []
            release: list[tuple[str, list[Any]]] = []
            for i, op, result in zip(go, ops, results, strict=True):
                token = cast(tuple[str, int], tokens[i])[0]
                if result is _RESERVATION_LOST:
                    tries[i] += 1
                    if tries[i] < 2:
                        later.append(i)
                        continue
                    result = StoreUnavailable(
                        "the email's reservation was taken over twice while this create was"
                        " on its way; nothing was written")
                out[i] = result
                email = op.new_email
                if isinstance(result, Event) and result.user.id == op.user.id:
                    confirm.append((email, [email, op.user.id, token]))
                elif isinstance(result, Event):  # its key's first write (a race): not ours
                    release.append((email, [email, op.user.id, token]))
                elif not isinstance(result, StoreUnavailable):
                    # Refused for sure. After an unknown outcome the reservation stays: the
                    # user may exist, and the next writer of the email checks which.
                    release.append((email, [email, op.user.id, token]))
            # Best effort, as in _confirm_email and _release_email: an entry left pending is
            # resolved by the next writer of its email.
            with contextlib.suppress(StoreUnavailable):
                await self._by_bucket(self._confirm, confirm)
                await self._by_bucket(self._release, release)
            pending = sorted(later)
        for i, earlier in same_as.items():
            out[i] = out[earlier]
        return cast(list[BulkResult], out)

    async def _replays(self, rows: Sequence[NewUser]) -> list[BulkResult | None]:
        """Per row: the outcome of its idempotency key's write, if the key is known."""
        asked = [(i, row.idempotency) for i, row in enumerate(rows) if row.idempotency]
        found: list[BulkResult | None] = [None] * len(rows)
        if not asked:
            return found

        async def read() -> list[Any]:
            async with self._r.pipeline(transaction=False) as pipe:
                for _i, idem in asked:
                    pipe.get(self._idem[idem.partition(self.partitions)] + idem.key)
                return cast(list[Any], await pipe.execute())

        async with self._calling():
            records = await _read_again(read)
        for (i, idem), record in zip(asked, records, strict=True):
            if record is not None:
                same = msgpack.unpackb(record, raw=True)[0].decode() == idem.fingerprint
                found[i] = replayed_event(record, self._digest) if same else idempotency_reused()
        return found

    async def _compare_and_set(
        self, user_id: str, expected_version: int | None,
        make_op: Callable[[User, str | None], _Op],
    ) -> Event:
        """As RedisStore's, with the email's reservation around an email change."""
        async with self._user_locks.hold(user_id):
            for attempt in range(_CAS_ATTEMPTS):
                current, pw_hash = await self._read(user_id)
                if expected_version is not None and current.version != expected_version:
                    raise VersionConflict(user_id, expected_version, current.version)
                op = make_op(current, pw_hash)
                moving = op.type is EventType.UPDATED and op.new_email != op.old_email
                reservation = await self._take_email(op.new_email, user_id) if moving else None
                (result,) = await self._apply([op], [reservation])
                if isinstance(result, Event):
                    if reservation is not None:
                        with contextlib.suppress(StoreUnavailable):
                            await self._confirm_email(op.new_email, user_id, reservation[0])
                    if moving or op.type is EventType.DELETED:
                        await self._release_email(op.old_email, user_id)
                    return result
                if isinstance(result, StoreUnavailable):
                    raise result  # outcome unknown: the reservation stays (see create_many)
                if reservation is not None:
                    await self._release_email(op.new_email, user_id, reservation[0])
                if result is _RESERVATION_LOST:
                    continue
                if isinstance(result, _Raced):
                    if expected_version is not None:
                        raise VersionConflict(user_id, expected_version, result.stored)
                    await asyncio.sleep(0.002 * (attempt + 1))
                    continue
                raise cast(HubError, result)
        raise Contention(user_id)

    async def _apply(
        self, ops: Sequence[_Op], reservations: Sequence[tuple[str, int] | None]
    ) -> list[Any]:
        """One partition.lua call per partition touched, all at once; outcomes in op order
        (BulkResult, _Raced, or _RESERVATION_LOST)."""
        if not self._ensured:
            await self.ensure_epoch()
        ts = now_us()
        by_partition: dict[int, list[int]] = {}
        for i, op in enumerate(ops):
            by_partition.setdefault(partition_of(op.user.id, self.partitions), []).append(i)
        out: list[Any] = [None] * len(ops)

        def extra_keys(p: int, indexes: list[int]) -> list[str]:
            """partition.lua's KEYS after the fixed ones: the ops' user keys, then the
            idempotency keys of those that have one."""
            users = [self._user_prefix[p] + ops[i].user.id for i in indexes]
            idems = [self._idem[p] + idem.key for i in indexes
                     if (idem := ops[i].idem) is not None]
            return users + idems

        def packed(indexes: list[int]) -> bytes:
            rows = []
            idem_at = _FIXED_KEYS + len(indexes)  # KEYS index (from 1) of the last idem key
            for i in indexes:
                op = ops[i]
                if op.idem is not None:
                    idem_at += 1
                rows.append([
                    _TYPE_CODE[op.type], op.user.id, op.expected,
                    b"" if op.type is EventType.DELETED else op.record(),
                    pack_event(op.type, op.user, ts), op.new_email,
                    *(reservations[i] or ("", 0)),
                    idem_at if op.idem is not None else 0, op.idem_args()[1]])
            return msgpack.packb(rows, use_bin_type=False)

        def outcomes(p: int, indexes: list[int], reply: Any) -> None:
            epoch = self._digest
            for n, i in enumerate(indexes):
                status, value = reply[2 + 2 * n], reply[3 + 2 * n]
                if status == _RESERVATION_LOST:
                    out[i] = _RESERVATION_LOST
                elif status == _SAME_AS:
                    out[i] = out[indexes[value - 1]]
                else:
                    out[i] = _result(status, value, ops[i], p, epoch, ts, epoch)

        async def one(p: int, indexes: list[int], first: Any = None) -> None:
            try:
                reply = await self._write_partition(
                    p, extra_keys(p, indexes), packed(indexes), ts, first)
            except HubError as exc:
                for i in indexes:
                    out[i] = exc
                return
            outcomes(p, indexes, reply)

        groups = list(by_partition.items())
        if len(groups) == 1 or self._replicas_ack:
            await asyncio.gather(*(one(p, indexes) for p, indexes in groups))
            return out
        # Many partitions (a bulk batch): every first try in one round trip per master; a
        # partition whose try met a moved epoch or a replaced history goes on by itself.
        tries = [self._write_try(p, extra_keys(p, indexes), packed(indexes), ts)
                 for p, indexes in groups]
        replies = await self._pipelined(self._write, [(keys, args) for keys, args, _ in tries])
        again = []
        for (p, indexes), (_, _, state), reply in zip(groups, tries, replies, strict=True):
            if isinstance(reply, Exception):
                refusal = self._refusal(reply)
                for i in indexes:
                    out[i] = refusal
            elif self._took(p, reply, *state):
                outcomes(p, indexes, reply)
            else:
                again.append(one(p, indexes, reply))
        await asyncio.gather(*again)
        return out

    def _write_try(self, p: int, extra: list[str], packed: bytes, ts: int
                   ) -> tuple[list[str], list[Any], tuple[str, int]]:
        """partition.lua's keys (`extra`: those after the fixed ones) and arguments for one
        try, and what _took needs after it."""
        keys = [self._meta[p], self._ids[p], self._log[p], self._fences[p], self._changes[p],
                self._deaths[p], self._tombs[p], *extra]
        tag = secrets.token_hex(4)
        offset, head = self._heads.get(p, (-1, ""))
        args = [secrets.token_hex(4), self._history_size, ts // 1000, self._history_max_age_ms,
                packed, tag, self._epochs[p], offset, head, self._channels[p],
                _RESERVATION_VALIDITY_MS, p, self._idem_window_ms, self._retention_ms]
        return keys, args, (tag, offset)

    def _took(self, p: int, reply: Any, tag: str, offset: int) -> bool:
        """Whether a try was applied (then what this process knows moves on)."""
        if reply[1] != _APPLIED:
            return False
        self._take_epoch(p, reply[0].decode() if reply[0] else "")
        last = max((v for s, v in zip(reply[2::2], reply[3::2], strict=True) if s == _OK),
                   default=-1)
        if last > offset:
            self._heads[p] = (last, tag)
        return True

    async def _write_partition(
        self, p: int, extra: list[str], packed: bytes, ts: int, first: Any = None
    ) -> Any:
        """Tries until applied: `first` is a try already made (and not applied)."""
        for _ in range(_WRITE_TRIES):
            if first is None:
                keys, args, (tag, offset) = self._write_try(p, extra, packed, ts)
                reply = await self._run_write(keys, args)
                if self._took(p, reply, tag, offset):
                    return reply
            else:
                reply, first = first, None
                offset = self._heads.get(p, (-1, ""))[0]
            epoch = reply[0].decode() if reply[0] else ""
            if reply[1] == _EPOCH_MOVED:
                self._take_epoch(p, epoch)
                self._heads.pop(p, None)
                continue
            log.error("the Redis history went back: partition %d is at offset %d, this process"
                      " had seen %d (a replica promoted before it had every write, or a node"
                      " restarted from older data); acknowledged writes after it are lost;"
                      " starting a new epoch so every subscriber is told", p, reply[2], offset)
            await self._rotate_partition(p, epoch)
        raise StoreUnavailable("the event history kept changing under this write; nothing was"
                               " written")

    async def _run_write(self, keys: list[str], args: list[Any]) -> Any:
        if not self._replicas_ack:
            async with self._calling(write=True):
                return await self._write(keys=keys, args=args)
        # WAIT counts the replicas that have this connection's writes, so it must follow the
        # script on the same connection: a pipeline on the owning master's own client (the
        # cluster client would send WAIT anywhere).
        for attempt in range(2):
            async with self._calling(write=True):
                node = self._r.get_node_from_key(keys[0])
                client, script = self._node_client(node.host, node.port)
                try:
                    async with client.pipeline(transaction=False) as pipe:
                        await script(keys=keys, args=args, client=pipe)
                        pipe.wait(self._replicas_ack, self._ack_timeout_ms)
                        reply, acked = await pipe.execute()
                except (redis_errors.MovedError, redis_errors.AskError,
                        redis_errors.TryAgainError) as exc:
                    # Not run: the slot is elsewhere (MOVED) or moving (ASK, TRYAGAIN).
                    if attempt or not isinstance(exc, redis_errors.MovedError):
                        raise StoreUnavailable(
                            f"the user store ({self.where}) is moving this partition's slot;"
                            " nothing was written") from exc
                    await self._r.nodes_manager.initialize()  # the slot table anew
                    continue
            if reply[1] == _APPLIED and acked < self._replicas_ack:
                raise too_few_replicas(acked, self._replicas_ack, self._ack_timeout_ms, "master")
            return reply
        raise AssertionError("unreachable")

    def _node_client(self, host: str, port: int) -> tuple[aioredis.Redis, Any]:
        found = self._nodes.get((host, port))
        if found is None:
            client = aioredis.Redis(host=host, port=port, max_connections=self._pool_size,
                                    **self._node_options)
            found = self._nodes[(host, port)] = (client, client.register_script(_PARTITION_LUA))
        return found

    # -- events ---------------------------------------------------------------------------

    @asynccontextmanager
    async def listen(self) -> AsyncIterator[AsyncIterator[EventBatch]]:
        """One sharded subscription per master, on that master's own connection, for the
        partitions whose slots it owns (as the cluster says now). A slot that moves away
        ends the subscription (Redis sends `sunsubscribe`), as does a lost connection or
        the audit finding a silent partition: the fan-out then listens again, on the new
        topology, and repairs the gap from history."""
        async with self._calling():
            # The slot table as it is now, not as it was (initialize() alone does nothing
            # on a client that has one).
            await self._r.initialize()
            await self._r.nodes_manager.initialize()
        by_node: dict[tuple[str, int], list[str]] = {}
        for channel in self._channels:
            node = self._r.get_node_from_key(channel)
            by_node.setdefault((node.host, node.port), []).append(channel)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        clients, pubsubs = [], []
        self._resubscribe = ""
        self._suspects.clear()
        try:
            with _cluster_failing(False, self.where):
                for (host, port), channels in by_node.items():
                    client = aioredis.Redis(host=host, port=port, **self._node_options)
                    clients.append(client)
                    pubsub = client.pubsub(ignore_subscribe_messages=False)
                    pubsubs.append(pubsub)
                    for channel in channels:  # one per command: a command is one slot's
                        await pubsub.ssubscribe(channel)
                    confirmed = 0
                    while confirmed < len(channels):
                        message = await pubsub.get_message(timeout=5)
                        if message is None:
                            raise StoreUnavailable("sharded pub/sub subscription on"
                                                   f" {host}:{port} was not confirmed")
                        confirmed += message["type"] == "ssubscribe"

            async def read(pubsub: Any, where: str) -> None:
                task = asyncio.current_task()
                try:
                    while True:
                        with _cluster_failing(False, self.where):
                            message = await pubsub.get_message(timeout=1.0)
                        if task is not None and task.cancelling():
                            # redis-py's read can swallow a cancellation and return None
                            # (see RedisStore.listen): the reader would never end.
                            raise asyncio.CancelledError
                        if message is None:
                            continue
                        if message["type"] == "sunsubscribe":
                            raise StoreUnavailable(f"a slot moved away from {where}:"
                                                   " subscribing on the new owner")
                        if message["type"] == "smessage":
                            await queue.put(message)
                except Exception as exc:  # handed to the consumer, which raises it
                    await queue.put(exc)

            # From here on every event arrives: what was written before counts as received
            # (the fan-out routes it from history), or a partition written once before a
            # lost message would look silent to the audit forever, resubscribing every
            # two audits.
            live = await self.position()
            self._live = list(live.offsets)
            self._suspects.clear()
            self._resubscribe = ""
            readers = [asyncio.create_task(read(ps, f"{h}:{p}"), name=f"listen-{h}:{p}")
                       for ps, (h, p) in zip(pubsubs, by_node, strict=True)]
            try:
                yield self._batches(queue)
            finally:
                for task in readers:
                    task.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
        finally:
            for pubsub in pubsubs:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _batches(self, queue: asyncio.Queue[Any]) -> AsyncIterator[EventBatch]:
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                # A cancellation something below swallowed (redis-py can, see read()):
                # without this, each timeout below would be taken for the only one.
                raise asyncio.CancelledError
            try:
                # asyncio.timeout, not wait_for: on Python 3.11, wait_for can drop the
                # cancellation of a get that completed at that moment (shutdown hung here).
                async with asyncio.timeout(1.0):
                    item = await queue.get()
            except TimeoutError:
                item = None
            if self._resubscribe:
                raise StoreUnavailable(self._resubscribe + ": subscribing again")
            if item is None:
                continue
            if isinstance(item, BaseException):
                raise item
            p = self._partition_of_channel.get(item["channel"])
            if p is None:
                continue
            batch = decode_batch(item["data"], self._shown_epoch)
            self._live[p] = max(self._live[p], batch.last_offset)
            yield batch

    async def ping(self) -> None:
        async with self._calling():
            info = await self._r.cluster_info()
        state = info.get("cluster_state", info.get(b"cluster_state"))
        state = state.decode() if isinstance(state, bytes) else state
        if state != "ok":
            raise StoreUnavailable(f"the user store ({self.where}) reports its cluster"
                                   f" {state or 'state unknown'}")

    async def aclose(self) -> None:
        for client, _ in self._nodes.values():
            await client.aclose()
        await self._r.aclose()
