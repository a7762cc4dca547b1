"""The import section: ImportUsers users/s (1000 rows per message, no passwords) beside
pipelined Redis writes of the same records."""

from __future__ import annotations

from loadtest.bench.base import _say
from loadtest.bench.plan import IMPORT_TARGET
from loadtest.bench.report import Row
from loadtest.bench.streams import StreamRuns


class ImportSection(StreamRuns):
    async def run_import(self) -> None:
        p = self.plan
        name = (f"ImportUsers users/s ({p.import_rows} rows per message, 1 stream,"
                f" {p.import_users:,} users, no passwords)")
        _say("  hub ImportUsers")
        hub, error = await self.attempt(
            "hub", self._best(lambda: self._stream_hub("import", p.import_users)))
        _say("  ceiling: pipelined Redis writes")
        redis_ceiling, redis_error = await self.redis_ceiling()
        row = Row("import", name, unit="users/s", workers=1,
                  target=f">= {IMPORT_TARGET:,.0f} users/s")
        row.fail("hub", error)
        row.fail("Redis ceiling", redis_error)
        if hub:
            row.hub, row.note = hub["per_s"], hub["note"]
            row.met = hub["per_s"] >= IMPORT_TARGET
        if redis_ceiling:
            row.ceiling, row.ceiling_label = redis_ceiling["per_s"], "pipelined Redis"
        row.cpu(hub["cpu"] if hub else {}, redis_ceiling["cpu"] if redis_ceiling else None)
        row.details = {"hub": hub, "redis_pipeline": redis_ceiling}
        self.rows.append(row.done())
