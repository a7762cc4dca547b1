"""The getuser section: GetUser requests/s from concurrent client loops beside a raw
grpc.aio unary echo of a pre-encoded User, once with 1 worker and once per core."""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import time
from typing import Any

import grpc.aio

from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_service_pb2_grpc as pb_grpc
from loadtest import fanout
from loadtest._subscriber import MAX_MESSAGE_BYTES
from loadtest.bench.base import CLIENTS, BenchBase, _say
from loadtest.bench.clients import build_users
from loadtest.bench.plan import GETUSER_TARGET_RATIO
from loadtest.bench.procs import BenchError, CpuMeter, Hub
from loadtest.bench.report import Row


class GetUserSection(BenchBase):
    async def run_getuser(self) -> None:
        p = self.plan
        name = (f"GetUser requests/s ({p.getuser_clients} client processes x"
                f" {p.getuser_concurrency} concurrent calls)")
        for workers in self.worker_counts():
            _say(f"  hub, {workers} worker(s)")
            hub, error = await self.attempt(
                "hub", self._best(functools.partial(self._getuser_hub, workers), p.getuser_runs))
            _say(f"  ceiling: raw grpc.aio unary echo, {workers} process(es)")
            user = hub["user"] if hub else ""
            raw, raw_error = await self.attempt(
                "ceiling", self._best(functools.partial(self._getuser_raw, workers, user),
                                      p.getuser_runs))
            row = Row("getuser", name, unit="req/s", workers=workers,
                      target=f">= {GETUSER_TARGET_RATIO:.0%} of the raw unary echo")
            row.fail("hub", error)
            row.fail("ceiling", raw_error)
            if hub:
                row.hub, row.note = hub["per_s"], hub["note"]
            if raw:
                row.ceiling = raw["per_s"]
                row.ceiling_label = f"{workers} raw process{'es' if workers > 1 else ''}"
            row.cpu(hub["cpu"] if hub else {}, raw["cpu"] if raw else None)
            row.details = {"hub": {k: v for k, v in (hub or {}).items() if k != "user"},
                           "raw": raw}
            row.done()
            if row.ratio is not None:
                row.met = row.ratio >= GETUSER_TARGET_RATIO
            self.rows.append(row)
        self.skipped_per_core("getuser", f"{name} (one worker per core)")

    async def _getuser_hub(self, workers: int) -> dict[str, Any]:
        async with self.hubs(f"getuser {workers}w", 1, workers) as hubs:
            ids, user = await self._seed_users(hubs[0].target, self.plan.getuser_users)
            result = await self._unary_load(hubs[0].target, ids, raw=False, hubs=hubs)
        if result["errors"]:
            raise BenchError(f"GetUser: {result['errors']:,} failed calls, first:"
                             f" {result['first_errors'][:2]}")
        return {**result, "user": user}

    async def _getuser_raw(self, workers: int, user: str) -> dict[str, Any]:
        async with self.children() as children:
            target, servers = await self.raw_servers(
                children, workers, *(["--user", user] if user else []))
            result = await self._unary_load(
                target, [], raw=True, hubs=[],
                extra={f"raw server {n + 1}": s.pid for n, s in enumerate(servers)})
        if result["errors"]:
            raise BenchError(f"raw echo: {result['errors']:,} failed calls, first:"
                             f" {result['first_errors'][:2]}")
        return result

    async def _seed_users(self, target: str, count: int) -> tuple[list[str], str]:
        """Creates `count` users to read; returns their ids and one of them, encoded."""
        async with grpc.aio.insecure_channel(target, options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]) as channel:
            stub = pb_grpc.UserServiceStub(channel)
            response = await stub.BulkCreateUsers(iter(build_users("get", count)), timeout=60)
            if response.created_count != count:
                raise BenchError(f"seeding GetUser: created {response.created_count} of {count}")
            user = await stub.GetUser(pb.GetUserRequest(user_id=response.user_ids[0]),
                                      timeout=10)
        return list(response.user_ids), base64.b64encode(user.SerializeToString()).decode()

    async def _unary_load(self, target: str, ids: list[str], raw: bool, hubs: list[Hub],
                          extra: dict[str, int] | None = None) -> dict[str, Any]:
        p = self.plan
        async with self.children() as children:
            clients = [await children.start(
                f"unary client {n + 1}", "unary", "--target", target,
                "--concurrency", str(p.getuser_concurrency),
                "--channels", str(p.getuser_channels), *(["--raw"] if raw else []),
                module=CLIENTS) for n in range(p.getuser_clients)]
            await children.ready(clients)
            pids = {**(self.base_pids(hubs) if hubs else {"harness": os.getpid()}),
                    **(extra or {}), **{c.name: c.pid for c in clients}}
            meter = CpuMeter(pids, clients=[c.name for c in clients],
                             trees=fanout.hub_pids(hubs))
            async with meter.running():
                start_at = time.time() + 0.5
                for client in clients:
                    await client.send(cmd="go", start_at=start_at, duration=p.getuser_duration,
                                      ids=ids)
                replies = await asyncio.gather(
                    *(c.recv(p.getuser_duration + 60) for c in clients))
        ok = sum(r["ok"] for r in replies)
        started = min(r["started"] for r in replies)
        ended = max(r["ended"] for r in replies)
        per_s = ok / max(ended - started, 1e-9)
        return {"per_s": round(per_s, 1), "calls": ok, "errors": sum(r["errors"] for r in replies),
                "first_errors": [e for r in replies for e in r["first_errors"]][:5],
                "p50_ms": max(r["p50_ms"] for r in replies),
                "p99_ms": max(r["p99_ms"] for r in replies),
                "cpu": meter.percent(started, ended),
                "note": f"{ok:,} calls in {ended - started:.1f} s; call latency p50"
                        f" {max(r['p50_ms'] for r in replies):.1f} ms,"
                        f" p99 {max(r['p99_ms'] for r in replies):.1f} ms"}
