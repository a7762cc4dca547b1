"""What the bulk and import sections share: one client stream of pre-built rows into a
fresh hub, verified against Redis, and the pipelined-Redis ceiling of the same records
(measured once per run)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from loadtest import fanout
from loadtest.bench.base import CLIENTS, BenchBase
from loadtest.bench.procs import BenchError, Child, CpuMeter, Hub

IDS_KEY = "hub:ids"


class StreamRuns(BenchBase):
    async def _stream_hub(self, kind: str, users: int) -> dict[str, Any]:
        """One client stream of `users` pre-built rows into a fresh hub; verified against the
        response and against Redis."""
        async with self.hubs(kind, 1, 1) as hubs, self.children() as children:
            client = await children.start(
                f"{kind} client", "stream", "--target", hubs[0].target, "--kind", kind,
                "--users", str(users), "--rows", str(self.plan.import_rows), module=CLIENTS)
            await children.ready([client], within=120)
            reply, cpu = await self._timed(client, {**self.base_pids(hubs), "client": client.pid},
                                           hubs)
            if "error" in reply:
                raise BenchError(f"{kind}: {reply['error']}")
            stored = int(await asyncio.to_thread(self.redis.zcard, IDS_KEY))
        problems = []
        if reply["created_count"] != users or reply["refused"]:
            problems.append(f"acknowledged {reply['created_count']:,} of {users:,} rows,"
                            f" {reply['refused']:,} refused ({reply['first_refusal']})")
        if reply["distinct_ids"] != reply["created_count"]:
            problems.append(f"{reply['distinct_ids']:,} distinct ids for"
                            f" {reply['created_count']:,} created")
        if stored != reply["created_count"]:
            problems.append(f"ZCARD {IDS_KEY} is {stored:,}, acknowledged"
                            f" {reply['created_count']:,}")
        if problems:
            raise BenchError(f"{kind}: " + "; ".join(problems))
        per_s = users / reply["seconds"]
        return {"per_s": round(per_s, 1), "seconds": round(reply["seconds"], 3), "users": users,
                "messages": reply["messages"], "stored": stored, "cpu": cpu,
                "note": f"{users:,} users in {reply['seconds']:.2f} s, {reply['messages']:,}"
                        f" messages; ZCARD {IDS_KEY} = {stored:,} = acknowledged"}

    async def _timed(self, client: Child, pids: dict[str, int],
                     hubs: list[Hub]) -> tuple[dict[str, Any], dict[str, float]]:
        """Sends "go" and waits for the reply, with the CPU of `pids` over that window."""
        meter = CpuMeter(pids, clients=["client"], trees=fanout.hub_pids(hubs))
        async with meter.running():
            t0 = time.time()
            await client.send(cmd="go")
            reply = await client.recv(900)
            t1 = time.time()
        return reply, meter.percent(t0, t1)

    async def redis_ceiling(self) -> tuple[dict[str, Any] | None, str]:
        """Pipelined Redis writes of plan.redis_users records, measured once per run."""
        if self._redis_ceiling is None:
            self._redis_ceiling = await self.attempt("Redis ceiling", self._redis_pipeline())
        return self._redis_ceiling

    async def _redis_pipeline(self) -> dict[str, Any]:
        users = self.plan.redis_users
        await asyncio.to_thread(self.redis.flushall)
        try:
            async with self.children() as children:
                client = await children.start(
                    "redis pipeline", "redis-pipeline", "--url", self.redis_url,
                    "--users", str(users), module=CLIENTS)
                await children.ready([client], within=120)
                reply, cpu = await self._timed(
                    client, {"redis": self.redis_proc.pid, "client": client.pid,
                             "harness": os.getpid()}, [])
        finally:
            await asyncio.to_thread(self.redis.flushall)
        if reply["errors"]:
            raise BenchError(f"redis pipeline: error replies {reply['errors'][:3]}")
        if reply["ids"] != users:
            raise BenchError(f"redis pipeline: ZCARD {reply['ids']:,}, wrote {users:,}")
        per_s = users / reply["seconds"]
        return {"per_s": round(per_s, 1), "seconds": round(reply["seconds"], 3), "users": users,
                "cpu": cpu, "note": f"ceiling: {users:,} users (HSETNX, HSET, ZADD, XADD each,"
                                    " pre-encoded) in pipelines of 1000 users, 4 in flight,"
                                    f" {reply['seconds']:.2f} s"}
