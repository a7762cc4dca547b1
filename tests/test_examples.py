"""The lobby examples (examples/python/lobby.py, examples/node/lobby.js) against a real hub.

Each runs as its own process, as README's "Examples" says to run it, over a `hub serve` on the
embedded store, while the test creates, updates and deletes users through hub.client: before
it lists, while it lists and while it watches. When it stops by itself (`--for`), the view in
its final JSON line must be the store's, user for user and version for version, and it must
have got every change made after its listing from the feed.
"""

from __future__ import annotations

import json
import queue
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from harness.hub import HubProcess
from hub.api.user.v1 import common_pb2
from hub.client import UserClient

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "examples" / "node"
# How long each lobby watches after its listing: the writes it must see take well under 1 s.
WATCH_SECONDS = 5.0
START_WITHIN = 20.0  # process start, imports and the listing, on a busy 2-core machine
NPM_WITHIN = 120.0  # `npm ci` when examples/node/node_modules is missing (a first run)

ACTIVE, INACTIVE = common_pb2.USER_STATUS_ACTIVE, common_pb2.USER_STATUS_INACTIVE


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    server = HubProcess(tmp_path, redis_url="")
    server.start()
    yield server
    server.kill()


def _node_lobby() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    modules = NODE_DIR / "node_modules" / "@grpc"
    if not ((modules / "grpc-js").is_dir() and (modules / "proto-loader").is_dir()):
        npm = shutil.which("npm") or "npm"
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=NPM_WITHIN, check=False)
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return [node, str(NODE_DIR / "lobby.js")]


def _python_lobby() -> list[str]:
    return [sys.executable, str(ROOT / "examples" / "python" / "lobby.py")]


class Lobby:
    """One example process, its stdout read line by line as it comes."""

    def __init__(self, command: list[str], target: str) -> None:
        self.proc = subprocess.Popen(
            [*command, "--target", target, "--for", str(WATCH_SECONDS)], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next line, None at the end of the output; raises queue.Empty on timeout."""
        line = self._queue.get(timeout=timeout)
        if line is not None:
            self.lines.append(line)
        return line

    def has_listed(self) -> bool:
        """Whether it has said its listing is done (without waiting)."""
        try:
            while (line := self.next_line(0)) is not None:
                if line.startswith("listed "):
                    return True
        except queue.Empty:
            return False
        self.fail("ended before it listed")

    def summary(self, within: float) -> dict[str, Any]:
        """Waits for it to exit by itself; its final JSON line."""
        try:
            code = self.proc.wait(within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.fail(f"still running {within:.0f}s after its --for {WATCH_SECONDS}s")
        while self.next_line(5) is not None:
            pass
        if code != 0 or not self.lines:
            self.fail(f"exited with {code}")
        summary: dict[str, Any] = json.loads(self.lines[-1])
        return summary

    def fail(self, why: str) -> NoReturn:
        self.kill()
        stderr = self.proc.stderr.read() if self.proc.stderr else ""
        pytest.fail(f"lobby {why}\n--- stdout:\n" + "\n".join(self.lines[-40:])
                    + f"\n--- stderr:\n{stderr}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Churn:
    """Creates, updates and deletes users, at random but reproducibly; counts its writes."""

    def __init__(self, client: UserClient, seed: int) -> None:
        self.client = client
        self.random = random.Random(seed)
        self.ids: list[str] = []
        self.made = 0
        self.writes = 0

    def create(self) -> None:
        self.made += 1
        status = self.random.choice((ACTIVE, INACTIVE))
        user = self.client.create_user(f"player{self.made}@example.com", f"Player {self.made}",
                                       status=status)
        self.ids.append(user.id)
        self.writes += 1

    def step(self) -> None:
        """One write: a create while there are few users, else an update or a delete."""
        roll = self.random.random()
        if len(self.ids) < 5 or roll < 0.3:
            self.create()
            return
        user_id = self.random.choice(self.ids)
        if roll < 0.5:
            self.ids.remove(user_id)
            self.client.delete_user(user_id)
        elif roll < 0.8:
            status = self.random.choice((ACTIVE, INACTIVE))
            self.client.update_user(user_id, status=status)
        else:
            self.client.update_user(user_id, name=f"Renamed {self.random.randrange(1000)}")
        self.writes += 1


def _store_view(client: UserClient) -> list[dict[str, Any]]:
    return [{"email": u.email, "id": u.id, "name": u.name,
             "status": common_pb2.UserStatus.Name(u.status), "version": u.version}
            for u in client.list_users()]


@pytest.mark.parametrize("command", [_python_lobby, _node_lobby], ids=["python", "node"])
def test_lobby_view_is_the_store(hub: HubProcess, command: Any) -> None:
    argv = command()  # may skip (no node) or install examples/node's packages first
    with UserClient(hub.target) as client:
        churn = Churn(client, seed=11)
        for _ in range(20):  # users the lobby finds in its listing
            churn.step()
        lobby = Lobby(argv, hub.target)
        try:
            # Writes go on while it starts and lists: some land after the listing's token
            # and inside the listing too, which the version rule must sort out.
            deadline = time.monotonic() + START_WITHIN
            while not lobby.has_listed():
                if time.monotonic() > deadline:
                    lobby.fail(f"did not list within {START_WITHIN:.0f}s")
                churn.step()
                time.sleep(0.01)
            # Every write from here on is after its token: the feed must bring each one.
            before, started = churn.writes, time.monotonic()
            for _ in range(40):
                churn.step()
            for user_id in churn.ids[:3]:
                client.update_user(user_id, status=ACTIVE, name="Last word")
                churn.writes += 1
            gone = churn.ids.pop()
            client.delete_user(gone)
            churn.writes += 1
            took = time.monotonic() - started
            assert took < WATCH_SECONDS / 2, f"the watched writes took {took:.1f}s"
            watched = churn.writes - before

            summary = lobby.summary(within=WATCH_SECONDS + 15)
        finally:
            lobby.kill()
        store = _store_view(client)

    assert summary["users"] == store
    assert summary["active"] == [u["id"] for u in store if u["status"] == "USER_STATUS_ACTIVE"]
    assert summary["events"] >= watched, summary  # each watched write came as an event
    assert summary["applied"] <= summary["events"]
    assert summary["resume_token"]
    assert any(line.startswith("lobby: ") for line in lobby.lines)
