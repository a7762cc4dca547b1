"""The bulk section: BulkCreateUsers users/s, one row per message, beside a raw grpc.aio
client stream of the same messages and pipelined Redis writes of the same records."""

from __future__ import annotations

import os
from typing import Any

from loadtest.bench.base import CLIENTS, _say
from loadtest.bench.plan import BULK_TARGET_RATIO
from loadtest.bench.procs import BenchError
from loadtest.bench.report import Row
from loadtest.bench.streams import StreamRuns


class BulkSection(StreamRuns):
    async def run_bulk(self) -> None:
        p = self.plan
        name = f"BulkCreateUsers users/s (1 row per message, 1 stream, {p.bulk_users:,} users)"
        _say("  hub BulkCreateUsers")
        hub, error = await self.attempt(
            "hub", self._best(lambda: self._stream_hub("bulk", p.bulk_users)))
        _say("  ceiling: raw grpc.aio client stream")
        raw, raw_error = await self.attempt(
            "ceiling", self._best(lambda: self._stream_raw(p.bulk_users)))
        _say("  ceiling: pipelined Redis writes")
        redis_ceiling, redis_error = await self.redis_ceiling()
        row = Row("bulk", name, unit="users/s", workers=1,
                  target=f">= {BULK_TARGET_RATIO:.0%} of the raw client stream")
        row.fail("hub", error)
        row.fail("ceiling", raw_error)
        if raw:
            row.ceiling, row.ceiling_label = raw["per_s"], "raw client stream, msg/s"
        row.details = {"hub": hub, "raw": raw}
        if hub:
            row.hub, row.note = hub["per_s"], hub["note"]
        row.cpu(hub["cpu"] if hub else {}, raw["cpu"] if raw else None)
        row.done()
        if row.ratio is not None:
            row.met = row.ratio >= BULK_TARGET_RATIO
        self.rows.append(row)
        second = Row("bulk", "BulkCreateUsers against pipelined Redis writes of the same"
                     " records", unit="users/s", workers=1)
        second.fail("hub", error)
        second.fail("Redis ceiling", redis_error)
        if hub:
            second.hub = hub["per_s"]
        if redis_ceiling:
            second.ceiling, second.ceiling_label = redis_ceiling["per_s"], "pipelined Redis"
            second.note = redis_ceiling["note"]
        second.cpu(hub["cpu"] if hub else {}, redis_ceiling["cpu"] if redis_ceiling else None)
        second.details = {"redis_pipeline": redis_ceiling}
        self.rows.append(second.done())

    async def _stream_raw(self, users: int) -> dict[str, Any]:
        async with self.children() as children:
            target, servers = await self.raw_servers(children, 1)
            client = await children.start(
                "raw stream client", "stream", "--target", target, "--kind", "raw",
                "--users", str(users), module=CLIENTS)
            await children.ready([client], within=120)
            reply, cpu = await self._timed(
                client, {"raw server": servers[0].pid, "client": client.pid,
                         "harness": os.getpid()}, [])
        if "error" in reply:
            raise BenchError(f"raw client stream: {reply['error']}")
        if reply["created_count"] != reply["messages"]:
            raise BenchError(f"raw client stream: counted {reply['created_count']:,} of"
                             f" {reply['messages']:,} messages")
        return {"per_s": round(reply["messages"] / reply["seconds"], 1),
                "seconds": round(reply["seconds"], 3), "messages": reply["messages"],
                "cpu": cpu}
