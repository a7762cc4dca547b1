"""A live lobby: who is in, and who is ACTIVE, kept up to date from hub's change feed.

    python examples/python/lobby.py --target 127.0.0.1:50051 [--for SECONDS]

The pattern is README's "List, then watch":

1. `ListUsers` streams every user; its trailing metadata carries `hub-resume-token`, a
   position taken just *before* the listing began.
2. `Sync` (here through `hub.client.SyncFeed`, which reconnects and resumes by itself)
   subscribed with that token replays every change made since, then goes on live. Some of
   those changes may already show in the listing, so an event is applied only if its
   `version` is newer than the one the lobby holds; a delete drops the user.

It prints a line per change and the lobby after each batch, and with `--for` it stops by
itself that many seconds after its listing. Its last line is always one JSON object, its
view: {"users": [{"id", "email", "name", "status", "version"}...] (in id order), "active":
[ids of ACTIVE users], "listed", "events", "applied", "resume_token"}. Ctrl-C (or SIGTERM)
stops it the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from typing import Any

import grpc.aio

from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.client import AsyncUserClient, ClientError, ContinuityLost, SyncFeed

# The trailing-metadata key under which ListUsers returns its resume token.
RESUME_TOKEN_KEY = "hub-resume-token"
SHOWN_NAMES = 10  # names printed per lobby line


class Lobby:
    """Users by id, each at the newest version seen (listing or event)."""

    def __init__(self) -> None:
        self.users: dict[str, common_pb2.User] = {}
        self.listed = 0  # users the listing returned
        self.events = 0  # events received
        self.applied = 0  # events that changed the view (the others were already in it)

    def add_listed(self, user: common_pb2.User) -> None:
        self.users[user.id] = user
        self.listed += 1

    def apply(self, event: common_pb2.UserEvent) -> str | None:
        """Applies one event if it is newer than what the lobby has; says what changed."""
        self.events += 1
        user = event.user
        held = self.users.get(user.id)
        if held is not None and user.version <= held.version:
            return None  # the listing (or an earlier event) already had this change
        if event.type == common_pb2.EVENT_TYPE_DELETED:
            if self.users.pop(user.id, None) is None:
                return None  # created and deleted before the lobby ever held it
            self.applied += 1
            return f"- {label(user)} left (v{user.version})"
        self.users[user.id] = user
        self.applied += 1
        if held is None:
            return f"+ {label(user)} joined, {status(user)} (v{user.version})"
        if held.status != user.status:
            return f"~ {label(user)} is now {status(user)} (v{user.version})"
        return f"~ {label(user)} changed (v{user.version})"

    def active(self) -> list[common_pb2.User]:
        return [u for _, u in sorted(self.users.items())
                if u.status == common_pb2.USER_STATUS_ACTIVE]

    def line(self) -> str:
        active = self.active()
        names = ", ".join(label(u) for u in active[:SHOWN_NAMES])
        more = f" (+{len(active) - SHOWN_NAMES} more)" if len(active) > SHOWN_NAMES else ""
        return f"lobby: {len(active)} active of {len(self.users)}: {names}{more}"

    def summary(self, resume_token: str) -> dict[str, Any]:
        return {
            "users": [
                {"id": u.id, "email": u.email, "name": u.name, "status": status_name(u),
                 "version": u.version}
                for _, u in sorted(self.users.items())
            ],
            "active": [u.id for u in self.active()],
            "listed": self.listed,
            "events": self.events,
            "applied": self.applied,
            "resume_token": resume_token,
        }


def status_name(user: common_pb2.User) -> str:
    return common_pb2.UserStatus.Name(user.status)


def status(user: common_pb2.User) -> str:
    return status_name(user).removeprefix("USER_STATUS_")


def label(user: common_pb2.User) -> str:
    return user.name or user.email or user.id


def say(text: str) -> None:
    print(text, flush=True)


async def list_users(target: str, lobby: Lobby) -> str:
    """Step 1: the listing, and the token positioned just before it."""
    async with AsyncUserClient(target) as client:
        # The raw stub: the call object also gives the trailing metadata.
        call = client.stub.ListUsers(pb.ListUsersRequest(page_size=500),
                                     timeout=client.stream_timeout)
        async for user in call:
            lobby.add_listed(user)
        trailing = await call.trailing_metadata()
    token = next((str(v) for k, v in trailing or () if k == RESUME_TOKEN_KEY), "")
    if not token:
        raise SystemExit(f"ListUsers sent no {RESUME_TOKEN_KEY!r}: is {target} a hub?")
    return token


async def watch(feed: SyncFeed, lobby: Lobby, started: float) -> None:
    """Step 2: every change since the listing, then live."""
    async for item in feed:
        if isinstance(item, ContinuityLost):
            # The history after our token is gone: SyncFeed snapshots again; rebuild from it.
            say(f"continuity lost ({item.reason}): rebuilding from a snapshot")
            lobby.users.clear()
            continue
        changes = [change for event in item.events if (change := lobby.apply(event))]
        for change in changes:
            say(f"[{time.monotonic() - started:6.2f}s] {change}")
        if changes:
            say(lobby.line())


async def main(target: str, seconds: float | None) -> int:
    lobby = Lobby()
    token = await list_users(target, lobby)
    say(f"listed {lobby.listed} users; watching from token {token[:12]}...")
    say(lobby.line())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    started = time.monotonic()
    async with SyncFeed(target, resume_token=token) as feed:
        watching = asyncio.create_task(watch(feed, lobby, started))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({watching, stopping}, timeout=seconds,
                           return_when=asyncio.FIRST_COMPLETED)
        for task in (watching, stopping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # re-raises what made the watch fail, if it did
        say(json.dumps(lobby.summary(feed.resume_token or token), sort_keys=True))
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051", help="hub address HOST:PORT")
    parser.add_argument("--for", dest="seconds", type=float, default=None, metavar="SECONDS",
                        help="stop this many seconds after the listing (default: Ctrl-C)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    try:
        sys.exit(asyncio.run(main(args.target, args.seconds)))
    except grpc.aio.AioRpcError as err:  # the listing (raw stub)
        sys.exit(f"lobby.py: {err.code().name}: {err.details()}")
    except ClientError as err:  # the watch (SyncFeed), on an error it cannot resume from
        sys.exit(f"lobby.py: {err.code.name}: {err.details}")
