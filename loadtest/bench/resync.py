"""The resync section: what a subscriber whose token has left the history costs when it
resumes by state (Subscribe.catch_up = CATCH_UP_STATE: only the users changed since, deletions
included) against a full snapshot of every user, on the same data in the same run.

One fresh hub (1 worker, --history-max-age plan.resync_history_age) on the flushed Redis; the
probe (`loadtest.resync_probe`, its own process) imports plan.resync_users users, takes a
token T past them, changes plan.resync_changed of them (plan.resync_deleted of those deleted,
the rest renamed). Nobody writes after that, so each partition's history stream expires whole
(write.lua's PEXPIRE) once the age has passed: the section waits until Redis holds none of
them, so T's events are gone. Then, alternating, resync_runs times each: the resync from T
(counted: users sent, SyncResponse bytes, seconds to resync_complete; every changed user
exactly once, nothing else, or the row is an error) and a snapshot (the same until
snapshot_complete), each with the hub's and Redis's CPU over it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loadtest import fanout
from loadtest.bench.base import BenchBase, _say
from loadtest.bench.plan import RESYNC_TARGET_RATIO
from loadtest.bench.procs import BenchError, Child, CpuMeter, Hub
from loadtest.bench.report import Row

PROBE = "loadtest.resync_probe"
_EXPIRY_SLACK = 20.0  # s past the history's max age: Redis expires keys lazily and by sampling


class ResyncSection(BenchBase):
    async def run_resync(self) -> None:
        p = self.plan
        name = (f"resync by state vs full snapshot ({p.resync_users:,} users,"
                f" {p.resync_changed:.0%} changed)")
        row = Row("resync", name, unit="KB", workers=1,
                  target=f"bytes and seconds <= {RESYNC_TARGET_RATIO:.0%} of the snapshot's;"
                         " users sent = users changed")
        found, error = await self.attempt("resync", self._resync())
        row.fail("setup", error)
        if found:
            _fill(row, found)
        self.rows.append(row.done())

    async def _resync(self) -> dict[str, Any]:
        p = self.plan
        flags = ["--history-max-age", f"{p.resync_history_age:g}"]
        async with self.hubs("resync", 1, 1, flags=flags) as hubs, \
                self.children() as children:
            probe = await children.start(
                "resync probe", "--target", hubs[0].target, "--users", str(p.resync_users),
                "--rows", "1000", "--changed", str(p.resync_changed),
                "--deleted", str(p.resync_deleted), module=PROBE)
            await children.ready([probe], within=120)
            _say(f"  import {p.resync_users:,} users")
            imported = await _ask(probe, "import", 600)
            if imported["created"] != p.resync_users or imported["refused"]:
                raise BenchError(f"import: created {imported['created']:,} of"
                                 f" {p.resync_users:,} ({imported['first_refusal']})")
            token = await _ask(probe, "token")
            changed = await _ask(probe, "change", 300)
            if changed["errors"]:
                raise BenchError(f"changes refused: {'; '.join(changed['errors'][:3])}")
            _say(f"  {changed['updated']:,} updated, {changed['deleted']:,} deleted; waiting"
                 f" for the history to expire ({p.resync_history_age:g} s)")
            expired = await self._history_gone(changed_at=time.monotonic())
            pids = {**self.base_pids(hubs), "probe": probe.pid}
            runs: dict[str, list[dict[str, Any]]] = {"resync": [], "snapshot": []}
            for n in range(p.resync_runs):
                for kind in ("resync", "snapshot"):
                    _say(f"  {kind} {n + 1}/{p.resync_runs}")
                    runs[kind].append(await self._measured(probe, kind, pids, hubs))
        return {"imported": imported, "token": token, "changed": changed,
                "expired_after_s": expired, **runs}

    async def _history_gone(self, changed_at: float) -> float:
        """Seconds from the last change until no partition's history stream is left in Redis
        (the token's events are gone); BenchError past the max age and some slack."""
        config = await asyncio.to_thread(self.redis.hgetall, "hub:config")
        partitions = int(config.get(b"partitions", 16))
        keys = [f"hub:log:{n}" for n in range(partitions)]
        deadline = changed_at + self.plan.resync_history_age + _EXPIRY_SLACK
        await asyncio.sleep(self.plan.resync_history_age)
        while True:
            left = int(await asyncio.to_thread(self.redis.exists, *keys))
            if not left:
                return round(time.monotonic() - changed_at, 2)
            if time.monotonic() > deadline:
                raise BenchError(f"{left} of {partitions} partitions' history streams still in"
                                 f" Redis {time.monotonic() - changed_at:.0f} s after the last"
                                 " write")
            await asyncio.sleep(0.1)

    async def _measured(self, probe: Child, kind: str, pids: dict[str, int],
                        hubs: list[Hub]) -> dict[str, Any]:
        """One measurement of the probe, with the CPU seconds each process spent over it."""
        meter = CpuMeter(pids, clients=["probe"], trees=fanout.hub_pids(hubs))
        async with meter.running():
            before = meter.snapshot()
            t0 = time.time()
            reply = await _ask(probe, kind, 900)
            t1 = time.time()
            after = meter.snapshot()
        cpu_ms = {k: round((after[1][k] - v) * 1000, 1) for k, v in before[1].items()
                  if k in after[1]}
        return {**reply, "cpu_ms": cpu_ms, "cpu": meter.percent(t0, t1)}


async def _ask(probe: Child, cmd: str, within: float = 60) -> dict[str, Any]:
    await probe.send(cmd=cmd)
    reply = await probe.recv(within)
    if reply.get("error") and cmd not in ("resync", "snapshot"):
        raise BenchError(f"{cmd}: {reply['error']}")
    return reply


def _best(runs: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The fastest run that got to its completing response, and what went wrong in any run (a
    status, a problem the probe found, or runs that did not all send the same users and
    bytes): a resync that sent more or fewer users than were changed keeps its figures but is
    an error."""
    wrong = [r["error"] or "; ".join(r["problems"]) for r in runs if r["error"] or r["problems"]]
    done = [r for r in runs if r["complete"] and not r["error"]]
    if len({(r["users"], r["bytes"]) for r in done}) > 1:
        wrong.append("runs sent different users or bytes: " + ", ".join(
            f"{r['users']:,} users {r['bytes']:,} B" for r in done))
    return (min(done, key=lambda r: r["seconds"]) if done else None), (wrong[0] if wrong else "")


def _fill(row: Row, found: dict[str, Any]) -> None:
    resync, resync_error = _best(found["resync"])
    snap, snap_error = _best(found["snapshot"])
    row.fail("resync", resync_error)
    row.fail("snapshot", snap_error)
    changed = found["changed"]
    changes = changed["updated"] + changed["deleted"]
    users = found["imported"]["created"]
    notes = [f"T taken after importing {users:,} users; then {changed['updated']:,} updated"
             f" + {changed['deleted']:,} deleted ({changes / users:.1%}); no history stream left"
             f" {found['expired_after_s']:.1f} s after the last change"]
    if resync:
        row.hub = resync["bytes"] / 1024
        notes.append(
            f"resync: {resync['updated']:,} EVENT_TYPE_SNAPSHOT + {resync['deleted']:,}"
            f" EVENT_TYPE_DELETED events with resync=true for the {changes:,} changes, in"
            f" {resync['responses']} responses, the first after"
            f" {resync['first_s'] * 1000:.0f} ms; {_cpu(resync)}")
    if snap:
        row.ceiling = snap["bytes"] / 1024
        row.ceiling_label = f"full snapshot: {snap['users']:,} users, {snap['seconds']:.2f} s"
        notes.append(f"snapshot: {snap['users']:,} users in {snap['responses']} responses;"
                     f" {_cpu(snap)}")
    if resync and snap:
        ratios = {k: resync[k] / snap[k] if snap[k] else float("inf")
                  for k in ("users", "bytes", "seconds")}
        row.hub_text = (f"{resync['users']:,} users, {resync['bytes'] / 1024:,.1f} KB,"
                        f" {resync['seconds']:.3f} s ({ratios['users']:.1%},"
                        f" {ratios['bytes']:.1%}, {ratios['seconds']:.1%} of the snapshot's)")
        row.met = ratios["bytes"] <= RESYNC_TARGET_RATIO and \
            ratios["seconds"] <= RESYNC_TARGET_RATIO and resync["users"] == changes
    runs = len(found["resync"])
    if runs > 1:
        notes.append(f"best of {runs} runs each, alternating (resync "
                     + ", ".join(f"{r['seconds']:.3f}" for r in found["resync"])
                     + " s; snapshot " + ", ".join(f"{r['seconds']:.2f}" for r in found["snapshot"])
                     + " s)")
    row.note = "; ".join(notes)
    row.cpu(resync["cpu"] if resync else {}, snap["cpu"] if snap else None)
    row.details = {"chart_label": "resync vs snapshot (bytes)", **found}


def _cpu(run: dict[str, Any]) -> str:
    """The CPU the hub and Redis spent over one measurement (from /proc: 10 ms ticks)."""
    cpu = run["cpu_ms"]
    return ", ".join(f"{label} CPU {cpu[key]:,.0f} ms" for key, label in
                     (("hub A", "hub"), ("redis", "Redis"), ("probe", "client")) if key in cpu)
