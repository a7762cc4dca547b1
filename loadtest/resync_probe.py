"""The measuring client of the bench's resync section (`loadtest.bench.resync`); not meant to be
run by hand.

    python -m loadtest.resync_probe --target HOST:PORT --users N [--rows 1000]
        [--changed 0.01] [--deleted 0.1]

Like the bench's other workers (`loadtest._subscriber`, whose JSON-lines helpers it shares) it
reads commands on stdin and writes one JSON reply per command on stdout, and stops when its
stdin closes. It builds its rows before replying ready; then, each on its command:

- {"cmd": "import"}: ImportUsers of --users rows (--rows per message, no passwords), one
  stream; keeps the ids and the trailing `hub-position` (a token covering every row).
- {"cmd": "token"}: a resume token T past the import: a Sync stream's Subscribe(user_ids=[an id
  nobody has], snapshot=True) gets its empty snapshot's `snapshot_complete` response, whose
  token is the engine's position; taken again (bounded) until every partition's offset is at
  least the import's `hub-position`, so no created user lies after T.
- {"cmd": "change"}: changes --changed of the users (spread over the ids, so over every
  partition): --deleted of them DeleteUser, the others UpdateUser (a new name); 32 calls in
  flight. Keeps what each user became (the version an update returned; a deletion) and, from
  each change's trailing `hub-position`, per partition the offset of the last change.
- {"cmd": "resync"}: Sync with Subscribe(resume_token=T, catch_up=CATCH_UP_STATE), all users:
  reads until the response with `resync_complete` (inclusive) and checks the events against
  the changes made: every updated user exactly once as EVENT_TYPE_SNAPSHOT with resync=true at
  the version its update returned, every deleted user exactly once as EVENT_TYPE_DELETED with
  resync=true, nothing else; every response before it carries T (resuming from one runs the
  resync again) and the completing one a token of the changes' epoch past every change. A
  status instead (OUT_OF_RANGE: the server did not resync) is reported with its ErrorInfo.
- {"cmd": "snapshot"}: Sync with Subscribe(snapshot=True), all users: reads until the response
  with `snapshot_complete` (inclusive); checks it sent every user left once.

Both measurements reply {"users": events counted, "bytes": serialized SyncResponse bytes (the
messages' ByteSize, without gRPC's framing), "seconds": from opening the stream to the
completing response read, "responses", "first_s", "problems": [...], "error": status or ""}.
Each opens its own stream on one connection made (and warmed by the token's stream) before.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import secrets
import sys
import time
from collections import Counter
from itertools import zip_longest
from typing import Any

import grpc
import grpc.aio
import msgpack
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hub.api.user.v1 import common_pb2, user_service_pb2, user_service_pb2_grpc
from hub.api.user.v1 import user_sync_service_pb2 as sync_pb
from loadtest._subscriber import NOBODY, _channel, _command, _reply, _stdin

SYNC = "/user.v1.UserSyncService/Sync"
POSITION_KEY = "hub-position"
_READY_TIMEOUT = 30.0
_CALL_TIMEOUT = 600.0
_IN_FLIGHT = 32
_TOKEN_WAIT = 10.0  # s: for the engine to route past the import
_MAX_PROBLEMS = 8


def _position(token: str) -> tuple[str, list[int]]:
    """(epoch, offsets) of a token (`hub.resume`'s documented format)."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    _, epoch, offsets = msgpack.unpackb(raw)
    return str(epoch), [int(o) for o in offsets]


def _status(err: grpc.aio.AioRpcError) -> str:
    """The status and, where it has one, its ErrorInfo (reason and metadata)."""
    text = f"{err.code().name}: {err.details()}"
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:
        status = None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            meta = ", ".join(f"{k}={v}" for k, v in sorted(info.metadata.items())
                             if k != "earliest_position")
            text += f" (ErrorInfo {info.reason}: {meta})"
    return text


def _differences(what: str, seen: Counter[str], expected: set[str]) -> list[str]:
    out = []
    missing = len(expected - seen.keys())
    extra = len(seen.keys() - expected)
    twice = sum(1 for n in seen.values() if n > 1)
    if missing:
        out.append(f"{missing:,} of {len(expected):,} {what} users not sent")
    if extra:
        out.append(f"{extra:,} {what} events for users not {what}")
    if twice:
        out.append(f"{twice:,} {what} users sent more than once")
    return out


class Probe:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        tag = secrets.token_hex(4)
        self.rows = [user_service_pb2.CreateUserRequest(
            email=f"resync-{tag}-{i}@example.com", name=f"Resync User {i}",
            status=common_pb2.USER_STATUS_ACTIVE) for i in range(args.users)]
        self.channel = _channel(args.target, 0)
        self.users = user_service_pb2_grpc.UserServiceStub(self.channel)
        # Responses as bytes: their size is what the wire carried (ByteSize), parsed after.
        self.sync: Any = self.channel.stream_stream(
            SYNC, request_serializer=sync_pb.SyncRequest.SerializeToString,
            response_deserializer=None)
        self.ids: list[str] = []
        self.position = ""  # the import's hub-position
        self.token = ""  # T
        self.updated: dict[str, int] = {}  # id -> the version its update returned
        self.deleted: set[str] = set()
        # Per partition the offset of the last change (their hub-positions), and its epoch.
        self.written: list[int] = []
        self.written_epoch = ""

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        handler = {"import": self.import_users, "token": self.take_token,
                   "change": self.change, "resync": self.resync,
                   "snapshot": self.snapshot}[command["cmd"]]
        try:
            return await handler()
        except grpc.aio.AioRpcError as err:
            return {"error": _status(err)}

    async def import_users(self) -> dict[str, Any]:
        n = self.args.rows
        messages = [user_service_pb2.ImportUsersRequest(users=self.rows[i:i + n])
                    for i in range(0, len(self.rows), n)]
        started = time.perf_counter()
        call = self.users.ImportUsers(iter(messages), timeout=_CALL_TIMEOUT)
        response = await call
        seconds = time.perf_counter() - started
        trailing = dict(await call.trailing_metadata() or ())
        self.ids = list(response.user_ids)
        self.position = str(trailing.get(POSITION_KEY, ""))
        first = response.errors[0] if response.errors else None
        return {"seconds": seconds, "messages": len(messages),
                "created": response.created_count, "distinct": len(set(self.ids)),
                "refused": len(response.errors), "position": bool(self.position),
                "first_refusal": f"row {first.index} code {first.code}: {first.message}"
                if first else ""}

    async def take_token(self) -> dict[str, Any]:
        epoch, floor = _position(self.position) if self.position else ("", [])
        deadline = time.monotonic() + _TOKEN_WAIT
        tries = 0
        while True:
            tries += 1
            token = await self._empty_snapshot_token()
            now_epoch, offsets = _position(token)
            behind = [p for p, (o, f) in enumerate(zip(offsets, floor, strict=False)) if o < f]
            if not behind and (not epoch or now_epoch == epoch):
                self.token = token
                return {"token": token, "tries": tries, "offsets": sum(offsets),
                        "import_offsets": sum(floor), "partitions": len(offsets)}
            if time.monotonic() > deadline:
                return {"error": f"after {_TOKEN_WAIT:g}s the engine's token is still behind"
                                 f" the import's hub-position in partitions {behind[:8]}"
                                 f" (epoch {now_epoch} vs {epoch})"}
            await asyncio.sleep(0.05)

    async def _empty_snapshot_token(self) -> str:
        call = self.sync(timeout=30)
        try:
            await call.write(sync_pb.SyncRequest(subscribe=common_pb2.Subscribe(
                user_ids=[NOBODY], snapshot=True)))
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    raise RuntimeError("token stream ended before snapshot_complete")
                response = sync_pb.SyncResponse.FromString(raw)
                if response.snapshot_complete:
                    return response.resume_token
        finally:
            call.cancel()

    async def change(self) -> dict[str, Any]:
        a = self.args
        count = max(1, round(len(self.ids) * a.changed))
        step = len(self.ids) / count
        chosen = [self.ids[int(i * step)] for i in range(count)]
        deletes = max(1, round(count * a.deleted)) if a.deleted > 0 else 0
        every = count / deletes if deletes else 0
        doomed = {chosen[int(i * every)] for i in range(deletes)}
        errors: list[str] = []
        positions: list[int] = []  # one per change that came with its hub-position
        gate = asyncio.Semaphore(_IN_FLIGHT)

        async def one(user_id: str) -> None:
            async with gate:
                try:
                    call: Any
                    if user_id in doomed:
                        call = self.users.DeleteUser(
                            user_service_pb2.DeleteUserRequest(user_id=user_id), timeout=30)
                        await call
                        self.deleted.add(user_id)
                    else:
                        call = self.users.UpdateUser(user_service_pb2.UpdateUserRequest(
                            user=common_pb2.User(id=user_id, name=f"Renamed {user_id}"),
                            update_mask=field_mask_pb2.FieldMask(paths=["name"])), timeout=30)
                        self.updated[user_id] = (await call).version
                    written = dict(await call.trailing_metadata() or ()).get(POSITION_KEY)
                    if written:
                        positions.append(1)
                        epoch, offsets = _position(str(written))
                        self.written_epoch = epoch
                        self.written = [max(a, b) for a, b in
                                        zip_longest(self.written, offsets, fillvalue=0)]
                except grpc.aio.AioRpcError as err:
                    if len(errors) < _MAX_PROBLEMS:
                        errors.append(f"{user_id}: {_status(err)}")

        started = time.perf_counter()
        await asyncio.gather(*(one(u) for u in chosen))
        return {"seconds": time.perf_counter() - started, "chosen": count,
                "updated": len(self.updated), "deleted": len(self.deleted),
                "positions": len(positions), "errors": errors}

    async def resync(self) -> dict[str, Any]:
        subscribe = common_pb2.Subscribe(resume_token=self.token,
                                         catch_up=common_pb2.CATCH_UP_STATE)
        updated: Counter[str] = Counter()
        deleted: Counter[str] = Counter()
        other: Counter[str] = Counter()  # events neither kind of resync event
        versions = 0  # updated users sent at another version than their update's

        def take(event: common_pb2.UserEvent) -> None:
            nonlocal versions
            kind = common_pb2.EventType.Name(event.type)
            if event.resync and event.type == common_pb2.EVENT_TYPE_SNAPSHOT:
                updated[event.user.id] += 1
                if self.updated.get(event.user.id, event.user.version) != event.user.version:
                    versions += 1
            elif event.resync and event.type == common_pb2.EVENT_TYPE_DELETED:
                deleted[event.user.id] += 1
            else:
                other[f"{kind}{' resync' if event.resync else ''}"] += 1

        out = await self._measure(subscribe, "resync_complete", take)
        problems = out["problems"]
        if not out["error"] and not problems:
            problems += _differences("updated", updated, set(self.updated))
            problems += _differences("deleted", deleted, self.deleted)
            if versions:
                problems.append(f"{versions:,} updated users sent at another version than"
                                " their update returned")
            if other:
                problems.append("events other than resync ones before resync_complete: "
                                + ", ".join(f"{n:,} {k}" for k, n in other.most_common()))
            problems += self._token_problems(out.pop("tokens"))
        changes = len(self.updated) + len(self.deleted)
        if out["users"] != changes and not out["error"]:
            problems.insert(0, f"sent {out['users']:,} users for {changes:,} changed")
        out.pop("tokens", None)
        return {**out, "updated": sum(updated.values()), "deleted": sum(deleted.values()),
                "other": sum(other.values()), "changes": changes}

    async def snapshot(self) -> dict[str, Any]:
        seen: Counter[str] = Counter()
        other: Counter[str] = Counter()
        versions = 0

        def take(event: common_pb2.UserEvent) -> None:
            nonlocal versions
            if event.type == common_pb2.EVENT_TYPE_SNAPSHOT and not event.resync:
                seen[event.user.id] += 1
                if self.updated.get(event.user.id, event.user.version) != event.user.version:
                    versions += 1
            else:
                other[common_pb2.EventType.Name(event.type)] += 1

        out = await self._measure(common_pb2.Subscribe(snapshot=True), "snapshot_complete", take)
        problems = out["problems"]
        if not out["error"] and not problems:
            problems += _differences("existing", seen, set(self.ids) - self.deleted)
            if versions:
                problems.append(f"{versions:,} updated users at another version")
            if other:
                problems.append("events other than snapshot ones: "
                                + ", ".join(f"{n:,} {k}" for k, n in other.most_common()))
        out.pop("tokens")
        return {**out, "expected": len(self.ids) - len(self.deleted)}

    def _token_problems(self, tokens: list[str]) -> list[str]:
        """The resync's responses before resync_complete carry T (resuming from them runs the
        resync again); the completing one a token of the current epoch past every change."""
        out = []
        early = sum(1 for t in tokens[:-1] if t != self.token)
        if early:
            out.append(f"{early} of {len(tokens) - 1} responses before resync_complete carry"
                       " another token than the one resumed from")
        if not tokens or not tokens[-1]:
            return [*out, "the resync_complete response carries no token"]
        epoch, offsets = _position(tokens[-1])
        behind = [p for p, (o, w) in enumerate(zip(offsets, self.written, strict=False))
                  if o < w]
        if self.written_epoch and epoch != self.written_epoch:
            out.append(f"the resync_complete token is of epoch {epoch}, the changes of"
                       f" {self.written_epoch}")
        elif behind:
            out.append(f"the resync_complete token is behind the changes in partitions"
                       f" {behind[:8]}")
        return out

    async def _measure(self, subscribe: common_pb2.Subscribe, complete: str,
                       take: Any) -> dict[str, Any]:
        users = size = responses = 0
        first = seconds = 0.0
        problems: list[str] = []
        error = ""
        complete_seen = False
        tokens: list[str] = []  # each response's
        started = time.perf_counter()
        call = self.sync(timeout=_CALL_TIMEOUT)
        try:
            await call.write(sync_pb.SyncRequest(subscribe=subscribe))
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    problems.append(f"the stream ended before {complete}")
                    break
                response = sync_pb.SyncResponse.FromString(raw)
                responses += 1
                size += len(raw)
                if responses == 1:
                    first = time.perf_counter() - started
                users += len(response.events)
                for event in response.events:
                    take(event)
                tokens.append(response.resume_token)
                if getattr(response, complete):
                    seconds = time.perf_counter() - started
                    complete_seen = True
                    break
        except grpc.aio.AioRpcError as err:
            error = _status(err)
        finally:
            call.cancel()
        if not complete_seen:
            seconds = time.perf_counter() - started
        return {"users": users, "bytes": size, "seconds": seconds, "first_s": first,
                "responses": responses, "complete": complete_seen, "tokens": tokens,
                "problems": problems[:_MAX_PROBLEMS], "error": error}


async def _run(args: argparse.Namespace) -> None:
    commands = await _stdin()
    probe = Probe(args)
    try:
        await asyncio.wait_for(probe.channel.channel_ready(), _READY_TIMEOUT)
        _reply({"ready": True, "rows": len(probe.rows)})
        while True:
            command = await _command(commands)
            if command["cmd"] == "stop":
                return
            _reply(await probe.handle(command))
    finally:
        await probe.channel.close(None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.resync_probe",
                                     description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--target", required=True, help="HOST:PORT of the hub")
    add("--users", type=int, required=True, help="users to import")
    add("--rows", type=int, default=1000, help="rows per ImportUsersRequest")
    add("--changed", type=float, default=0.01, help="share of the users changed")
    add("--deleted", type=float, default=0.1, help="share of the changed users deleted")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        asyncio.run(_run(args))
    except (KeyboardInterrupt, BrokenPipeError):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
