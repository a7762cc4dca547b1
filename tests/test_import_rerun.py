"""`hub user import` run again after a crash: every row is created exactly once, and the rows
an earlier run created are reported created (not refused as taken emails), because each row
carries an idempotency key made from the file's content and its row number.

Real `hub serve` processes on a real Redis; the imports are real `hub` subprocesses, killed
with SIGKILL midway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import redis

from harness.hub import HubProcess
from harness.redis import dying_with_parent
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.cli import ImportFile, RowKeys, request_of
from hub.client import AsyncUserClient, SyncBatch, SyncFeed, UserClient

pytestmark = pytest.mark.anyio


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}


def hub_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hub", *args], input=stdin, env=clean_env(),
                          capture_output=True, text=True, timeout=120, check=False)


def import_file(server: HubProcess, *args: str, stdin: str | None = None
                ) -> subprocess.CompletedProcess[str]:
    return hub_cli("user", "import", "--target", server.target, *args, stdin=stdin)


def jsonl(rows: int, tag: str = "u", start: int = 0) -> str:
    return "".join(json.dumps({"email": f"{tag}{i}@example.com", "name": f"User {i}"}) + "\n"
                   for i in range(start, start + rows))


def emails(server: HubProcess) -> list[str]:
    with UserClient(server.target, stream_timeout=60) as users:
        return [u.email for u in users.list_users(page_size=1000)]


def ids_by_email(server: HubProcess) -> dict[str, str]:
    with UserClient(server.target, stream_timeout=60) as users:
        return {u.email: u.id for u in users.list_users(page_size=1000)}


async def test_an_import_killed_midway_and_run_again_creates_every_row_once(
    redis_url: str, hub_process: Callable[..., HubProcess], tmp_path: Path,
) -> None:
    # The hub slows a bulk stream to its write rate, so the import takes ~3 s: time to kill it.
    rows = 15_000
    server = hub_process(redis_url, args=["--write-rate", "5000", "--write-burst", "1000"])
    users_file = tmp_path / "users.jsonl"
    users_file.write_text(jsonl(rows))

    first = await anyio.to_thread.run_sync(start_import, server, users_file)
    try:
        await anyio.to_thread.run_sync(kill_once_written, first, redis_url, 2_000)
    finally:
        first.kill()
        first.wait(30)
    # Writes the hub had already sent to Redis complete: wait until the count stops moving.
    before, after = -1, len(emails(server))
    while before != after:
        await anyio.sleep(0.5)
        before, after = after, len(emails(server))
    assert 0 < after < rows, after
    kept = ids_by_email(server)
    result, created = await count_created_events(
        server, lambda: import_file(server, str(users_file)))
    assert result.returncode == 0, result.stderr
    # Every row counts as created: the first run's rows again (no new event, same user), the
    # rest for the first time.
    assert result.stdout == f"created {rows}, refused 0\n"
    final = ids_by_email(server)
    final.pop(MARKER)
    assert sorted(final) == sorted(f"u{i}@example.com" for i in range(rows))
    assert all(final[email] == user_id for email, user_id in kept.items())
    assert created == rows - len(kept)  # one event per user, none for a row seen before


MARKER = "marker@example.com"


def start_import(server: HubProcess, path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        dying_with_parent([sys.executable, "-m", "hub", "user", "import", "--target",
                           server.target, str(path)]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())


def kill_once_written(proc: subprocess.Popen[bytes], redis_url: str, users: int) -> None:
    """SIGKILL `proc` (an import) as soon as Redis holds `users` more keys than before it: at
    least that many users (each user is a key of its own at least). Asked of Redis, not the
    hub: a listing of thousands of users is too slow a clock."""
    deadline = time.monotonic() + 60
    with redis.Redis.from_url(redis_url) as client:
        base = client.dbsize()
        while client.dbsize() < base + users:
            assert proc.poll() is None, "the import ended before it could be killed"
            assert time.monotonic() < deadline, "the import created too few users"
            time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)


async def count_created_events(
    server: HubProcess, run: Callable[[], subprocess.CompletedProcess[str]],
) -> tuple[subprocess.CompletedProcess[str], int]:
    """What `run` (in a thread) returned, and how many users it created: the CREATED events
    a feed, subscribed before it, received until a marker write after it."""
    created: list[str] = []
    marker = MARKER
    live, done = anyio.Event(), anyio.Event()
    feed = SyncFeed(server.target, backoff=(0.05, 0.5))

    async def follow() -> None:
        async for item in feed:
            live.set()
            assert isinstance(item, SyncBatch)
            for event in item.events:
                if event.type == common_pb2.EVENT_TYPE_CREATED:
                    if event.user.email == marker:
                        done.set()
                    else:
                        created.append(event.user.email)

    with anyio.fail_after(120):
        async with feed, anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await live.wait()
            result = await anyio.to_thread.run_sync(run)
            async with AsyncUserClient(server.target) as users:
                await users.create_user(marker)
            await done.wait()
            tg.cancel_scope.cancel()
    assert len(set(created)) == len(created), "a user created twice"
    return result, len(created)


def test_a_prefix_sent_with_the_same_keys_is_reported_created(
    redis_url: str, hub_process: Callable[..., HubProcess], tmp_path: Path,
) -> None:
    server = hub_process(redis_url)
    users_file = tmp_path / "users.jsonl"
    users_file.write_text(jsonl(100))
    # What a run that crashed after 40 rows had sent: those rows with the keys the CLI gives.
    source = ImportFile(users_file)
    keys = RowKeys(source)
    sent: list[tuple[pb.CreateUserRequest, str]] = []
    for index, row in enumerate(source.rows()):
        assert isinstance(row, dict)
        request = request_of(row)
        assert isinstance(request, pb.CreateUserRequest)
        sent.append((request, keys.key(index, row)))
    with UserClient(server.target) as users:
        first = users.import_users(sent[:40])
    assert first.created_count == 40
    before = ids_by_email(server)

    result = import_file(server, str(users_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "created 100, refused 0\n"
    after = ids_by_email(server)
    assert len(after) == 100 and all(after[e] == i for e, i in before.items())

    # Run again whole: nothing is created, every row reported created.
    assert import_file(server, str(users_file)).stdout == "created 100, refused 0\n"
    assert ids_by_email(server) == after


def test_row_keys_follow_the_content_not_the_name(tmp_path: Path) -> None:
    a = tmp_path / "a.jsonl"
    a.write_text(jsonl(3))
    copy = tmp_path / "elsewhere" / "b.jsonl"
    copy.parent.mkdir()
    copy.write_text(a.read_text())
    edited = tmp_path / "c.jsonl"
    edited.write_text(jsonl(3).replace("User 2", "User Two"))
    csv_of_it = tmp_path / "a.csv"
    csv_of_it.write_text(a.read_text())

    def keys(path: Path, fmt: str | None = None) -> list[str]:
        source = ImportFile(path, fmt)
        row_keys = RowKeys(source)
        return [row_keys.key(i, row) for i, row in enumerate(source.rows())]

    assert keys(a) == keys(copy) == keys(a)  # the same content: the same keys, wherever
    assert len(set(keys(a))) == 3  # one per row
    assert set(keys(edited)).isdisjoint(keys(a))  # any change: every key differs
    assert set(keys(csv_of_it, "jsonl")) == set(keys(a))
    assert keys(a)[0].startswith("import-") and all(len(k) < 100 for k in keys(a))


def test_an_edited_file_does_not_reuse_the_first_files_keys(
    redis_url: str, hub_process: Callable[..., HubProcess], tmp_path: Path,
) -> None:
    server = hub_process(redis_url)
    original = tmp_path / "users.jsonl"
    original.write_text(jsonl(10))
    assert import_file(server, str(original)).stdout == "created 10, refused 0\n"

    # The same rows, one renamed: another file. Its rows are new writes, refused as taken
    # emails, never "idempotency-key reused for another request".
    edited = tmp_path / "edited.jsonl"
    edited.write_text(jsonl(10).replace("User 4", "User Four"))
    result = import_file(server, str(edited))
    assert result.returncode == 1
    assert result.stdout == "created 0, refused 10\n"
    refusals = [line for line in result.stderr.splitlines() if line.startswith("row ")]
    assert len(refusals) == 10 and all("already registered" in r for r in refusals), refusals
    assert "idempotency" not in result.stderr

    # Without keys, a run again of the original is refused the same way.
    again = import_file(server, "--no-idempotency-keys", str(original))
    assert again.stdout == "created 0, refused 10\n"
    assert len(emails(server)) == 10


def test_stdin_run_again_creates_every_row_once(
    redis_url: str, hub_process: Callable[..., HubProcess],
) -> None:
    server = hub_process(redis_url)
    rows = jsonl(50)
    lines = rows.splitlines(keepends=True)
    # A run that stopped after 20 rows sent the same first 20 rows with the same keys.
    head = import_file(server, "-", "--format", "jsonl", stdin="".join(lines[:20]))
    assert head.stdout == "created 20, refused 0\n", head.stderr
    before = ids_by_email(server)
    whole = import_file(server, "-", "--format", "jsonl", stdin=rows)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout == "created 50, refused 0\n"
    after = ids_by_email(server)
    assert len(after) == 50 and all(after[e] == i for e, i in before.items())


def test_the_import_help_says_it_can_be_run_again() -> None:
    result = hub_cli("user", "import", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "Re-runnable" in text and "--no-idempotency-keys" in text
    assert "--idempotency-window" in text
