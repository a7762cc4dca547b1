"""SyncFeed across a history trim: a feed away long enough for its events to leave the history
resumes by state (Subscribe.catch_up = CATCH_UP_STATE) instead of starting over. It yields
the changed users and the deleted ones (SyncBatch.resync), then a `Resynced`, and the view it
built equals the hub's, user by user; only what changed was sent. What a resync cannot stand
in for (an epoch change) is still a `ContinuityLost`, now with the hub's advice in it.

Real `hub serve` processes on a real Redis, one partition keeping about 10 events.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import anyio
import pytest
import redis

from harness.hub import HubProcess
from harness.redis import dying_with_parent
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.client import AsyncUserClient, ContinuityLost, Resynced, SyncBatch, SyncFeed

pytestmark = pytest.mark.anyio

SMALL = ["--partitions", "1", "--history-size", "10"]
FAST = {"HUB_HEARTBEAT_INTERVAL": "0.2"}
View = dict[str, common_pb2.User]


def apply(view: View, event: common_pb2.UserEvent) -> None:
    """The README's view: keep a user if the event's version is newer; drop it when deleted."""
    user = event.user
    if event.type == common_pb2.EVENT_TYPE_DELETED:
        view.pop(user.id, None)
    elif user.id not in view or user.version > view[user.id].version:
        view[user.id] = user


async def hub_view(users: AsyncUserClient) -> View:
    return {u.id: u async for u in users.list_users()}


async def snapshot_view(target: str) -> tuple[View, str]:
    """A view built from a snapshot, and the token to resume it from."""
    view: View = {}
    feed = SyncFeed(target, snapshot=True)
    with anyio.fail_after(20):
        async with feed:
            async for item in feed:
                assert isinstance(item, SyncBatch)
                for event in item.events:
                    apply(view, event)
                if item.snapshot_complete:
                    break
    return view, feed.resume_token


async def trim(users: AsyncUserClient, user_id: str, writes: int = 250) -> None:
    """Enough writes (to one user) that the history no longer reaches back before them (Redis
    trims a stream `MAXLEN ~` a whole node, 100 entries, at a time)."""
    for i in range(writes):
        await users.update_user(user_id, name=f"noise {i}")


async def test_a_feed_resumed_past_the_history_resyncs_and_equals_the_hub(
    redis_url: str, hub_process: Callable[..., HubProcess],
) -> None:
    hub = hub_process(redis_url, args=SMALL, **FAST)
    async with AsyncUserClient(hub.target) as users:
        bulk = await users.import_users(
            [pb.CreateUserRequest(email=f"u{i}@example.com", name=f"U{i}") for i in range(30)])
        ids = list(bulk.user_ids)
        view, token = await snapshot_view(hub.target)
        assert view == await hub_view(users)

        # Away: some users change, some go, some come, and the history moves on past it all.
        for user_id in ids[:5]:
            await users.update_user(user_id, name="changed")
        for user_id in ids[5:8]:
            await users.delete_user(user_id)
        fresh = [(await users.create_user(f"new{i}@example.com")).id for i in range(4)]
        await trim(users, ids[8])

        items: list[SyncBatch | ContinuityLost] = []
        feed = SyncFeed(hub.target, resume_token=token)
        with anyio.fail_after(30):
            async with feed:
                async for item in feed:
                    items.append(item)
                    if isinstance(item, SyncBatch):
                        for event in item.events:
                            apply(view, event)
                    if isinstance(item, Resynced):
                        break
                # Then live: a write after the resync arrives as usual.
                late = await users.create_user("late@example.com")
                async for item in feed:
                    assert isinstance(item, SyncBatch) and not item.resync
                    for event in item.events:
                        apply(view, event)
                    if late.id in view:
                        break
        assert not [i for i in items if isinstance(i, ContinuityLost)], items
        done = items[-1]
        assert isinstance(done, Resynced)
        changed = {*ids[:5], ids[8], *fresh}
        assert set(done.updated) == changed  # only what changed: no full snapshot
        assert set(done.deleted) == set(ids[5:8])
        sent = [e for i in items if isinstance(i, SyncBatch) for e in i.events]
        assert all(e.resync for e in sent)
        assert len({e.user.id for e in sent}) == len(changed) + 3
        # Mid-resync batches carry the old token (safe to save); the feed takes the new one.
        assert all(i.resume_token == token and (i.resync or not i.events) for i in items[:-1]
                   if isinstance(i, SyncBatch))
        assert done.resume_token != token and feed.resume_token != token
        assert view == await hub_view(users)  # user by user, deletions applied


async def test_without_resync_an_expired_token_is_continuity_lost_with_the_hubs_advice(
    redis_url: str, hub_process: Callable[..., HubProcess],
) -> None:
    hub = hub_process(redis_url, args=SMALL, **FAST)
    async with AsyncUserClient(hub.target) as users:
        ada = await users.create_user("ada@example.com")
        _, token = await snapshot_view(hub.target)
        await trim(users, ada.id)
        feed = SyncFeed(hub.target, resume_token=token, resync=False)
        items: list[SyncBatch | ContinuityLost] = []
        with anyio.fail_after(30):
            async with feed:
                async for item in feed:
                    items.append(item)
                    if isinstance(item, SyncBatch) and item.snapshot_complete:
                        break
    lost = items[0]
    assert isinstance(lost, ContinuityLost), items
    assert (lost.reason, lost.action) == ("HISTORY_EXPIRED", "RESYNC_BY_STATE")
    assert lost.epoch and lost.earliest_position
    snapshot = [e for i in items[1:] if isinstance(i, SyncBatch) for e in i.events]
    assert [(e.type, e.user.id) for e in snapshot] == [(common_pb2.EVENT_TYPE_SNAPSHOT, ada.id)]


async def test_an_epoch_change_is_still_continuity_lost(
    redis_url: str, hub_process: Callable[..., HubProcess],
) -> None:
    hub = hub_process(redis_url, args=SMALL, **FAST)
    async with AsyncUserClient(hub.target) as users:
        await users.create_user("a@example.com")
        _, token = await snapshot_view(hub.target)
        redis.Redis.from_url(redis_url).flushall()  # the history is gone: a new epoch
        bob = await create_retrying(users, "b@example.com")
        feed = SyncFeed(hub.target, resume_token=token)
        items: list[SyncBatch | ContinuityLost] = []
        with anyio.fail_after(30):
            async with feed:
                async for item in feed:
                    items.append(item)
                    if isinstance(item, SyncBatch) and item.snapshot_complete:
                        break
    lost = items[0]
    assert isinstance(lost, ContinuityLost), items
    assert (lost.reason, lost.action) == ("EPOCH_CHANGED", "SNAPSHOT")
    assert lost.epoch
    assert not [i for i in items if isinstance(i, Resynced)]
    assert [e.user.id for i in items[1:] if isinstance(i, SyncBatch) for e in i.events] == [
        bob.id]


async def create_retrying(users: AsyncUserClient, email: str) -> common_pb2.User:
    """The first write after a FLUSHALL may be refused UNAVAILABLE (the hub finds its history
    replaced); a keyed create is retried by the client, and is safe to be."""
    return await users.create_user(email, idempotency_key=f"create {email}", timeout=20)


def start_watch(target: str, token: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        dying_with_parent([sys.executable, "-m", "hub", "watch", "--target", target,
                           "--resume-token", token]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def test_hub_watch_resumes_by_state_and_says_so(
    redis_url: str, hub_process: Callable[..., HubProcess],
) -> None:
    hub = hub_process(redis_url, args=SMALL, **FAST)
    async with AsyncUserClient(hub.target) as users:
        ada = await users.create_user("ada@example.com")
        gone = await users.create_user("gone@example.com")
        _, token = await snapshot_view(hub.target)
        await users.delete_user(gone.id)
        await trim(users, ada.id)
    watch = await anyio.to_thread.run_sync(start_watch, hub.target, token)
    lines: queue.Queue[str] = queue.Queue()

    def read_stderr() -> None:
        assert watch.stderr is not None
        for line in watch.stderr:
            lines.put(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    said: list[str] = []
    try:
        with anyio.fail_after(30):
            while not any(line.startswith("hub: resynced") for line in said):
                try:
                    said.append(lines.get_nowait())
                except queue.Empty:
                    assert watch.poll() is None, f"hub watch exited: {said}"
                    await anyio.sleep(0.05)
    finally:
        watch.send_signal(signal.SIGTERM)
        assert watch.stdout is not None
        out = watch.stdout.read()
        watch.wait(30)
    resynced = next(line for line in said if line.startswith("hub: resynced"))
    assert "1 users changed and 1 deleted" in resynced, resynced
    printed = [row for row in out.splitlines() if '"resync": true' in row]
    assert len(printed) == 2 and any("EVENT_TYPE_DELETED" in row for row in printed), out


async def test_a_resync_cut_midway_runs_again_on_the_other_instance(
    redis_url: str, hub_process: Callable[..., HubProcess],
) -> None:
    a, b = (hub_process(redis_url, args=SMALL, **FAST) for _ in range(2))
    async with AsyncUserClient(a.target) as users:
        await users.create_user("first@example.com")
        view, token = await snapshot_view(a.target)
        # Many users changed since the token: a resync of many responses.
        await users.import_users(
            [pb.CreateUserRequest(email=f"u{i}@example.com") for i in range(3000)])
        items: list[SyncBatch | ContinuityLost] = []
        feed = SyncFeed([a.target, b.target], resume_token=token, backoff=(0.05, 0.2))
        killed_at = -1
        with anyio.fail_after(60):
            async with feed:
                async for item in feed:
                    items.append(item)
                    assert isinstance(item, SyncBatch), item
                    for event in item.events:
                        apply(view, event)
                    if isinstance(item, Resynced):
                        break
                    if item.resync and killed_at < 0:
                        # Cut in the middle: the feed goes on on B, from the old token.
                        a.kill()
                        killed_at = len(items)
                        assert feed.resume_token == token
        assert killed_at > 0, "the resync came in one response: nothing to cut"
        assert feed.reconnects >= 1
        done = items[-1]
        assert isinstance(done, Resynced) and len(done.updated) == 3000
    async with AsyncUserClient(b.target) as other:
        assert view == await hub_view(other)


async def test_beyond_the_tombstone_retention_it_is_continuity_lost_and_a_snapshot(
    redis_url: str, hub_process: Callable[..., HubProcess],
) -> None:
    hub = hub_process(redis_url, args=[*SMALL, "--tombstone-retention", "1"], **FAST)
    async with AsyncUserClient(hub.target) as users:
        ada = await users.create_user("ada@example.com")
        gone = await users.create_user("gone@example.com")
        _, token = await snapshot_view(hub.target)
        await users.delete_user(gone.id)
        await anyio.sleep(1.5)  # its tombstone's retention passes
        await trim(users, ada.id)
        feed = SyncFeed(hub.target, resume_token=token)
        items: list[SyncBatch | ContinuityLost] = []
        with anyio.fail_after(30):
            async with feed:
                async for item in feed:
                    items.append(item)
                    if isinstance(item, SyncBatch) and item.snapshot_complete:
                        break
    lost = items[0]
    # A deletion since the token can no longer be told: a resync would miss it.
    assert isinstance(lost, ContinuityLost), items
    assert (lost.reason, lost.action) == ("HISTORY_EXPIRED", "SNAPSHOT")
    snapshot = [e.user.id for i in items[1:] if isinstance(i, SyncBatch) for e in i.events]
    assert snapshot == [ada.id]


async def test_a_feed_that_stalls_past_the_history_is_resynced_in_place(
    redis_url: str, hub_process: Callable[..., HubProcess],
) -> None:
    # A live feed (no token) whose consumer stops reading while far more is written than the
    # history keeps: the hub stops buffering for it, its position leaves the history, and the
    # stream resyncs by state instead of ending; the feed never reconnects.
    hub = hub_process(redis_url, args=[*SMALL, "--subscriber-max-events", "200",
                                       "--bulk-batch-size", "100"], **FAST)
    small_window = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16_384))
    view: View = {}
    feed = SyncFeed(hub.target, options=small_window)
    stalled, go_on = anyio.Event(), anyio.Event()
    items: list[SyncBatch | ContinuityLost] = []

    async def follow() -> None:
        async for item in feed:
            items.append(item)
            assert isinstance(item, SyncBatch), item
            for event in item.events:
                apply(view, event)
            if not stalled.is_set():
                stalled.set()  # subscribed (a heartbeat); now it stops reading
                await go_on.wait()
            if isinstance(item, Resynced):
                return

    async with AsyncUserClient(hub.target) as users, feed:
        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await stalled.wait()
                for n in range(4):
                    await users.import_users(
                        [pb.CreateUserRequest(email=f"s{n}-{i}@example.com", name="x" * 200)
                         for i in range(1000)])
                await anyio.sleep(1)
                go_on.set()
        assert isinstance(items[-1], Resynced)
        assert feed.reconnects == 0
        assert view == await hub_view(users)
