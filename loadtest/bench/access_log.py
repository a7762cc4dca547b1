"""The access-log section (`--only access-log`; not in the default run): what the access log
costs a GetUser, measured with the getuser section's load and clients against a fresh
1-worker hub per access-log state, each figure beside the same hub with the access log off.

The states: off (`--no-access-log`), every call logged in text, every call in JSON (one
object per line), and a sampled fraction (`--access-log-sample`, default 1%) in text; all at
`--log-level INFO`, the hub's stdout and stderr going to a file as in a deployment whose log
is collected (a pipe nobody read would block the hub). They run in rounds, every state once
a round, the order rotated each round, so a busy moment on a shared machine falls on all of
them alike; the best run of each state counts and the note lists every run.

With `--access-log-before DIR` (a checkout of another commit, e.g. `git worktree add
/tmp/hub-old REV`) the same rounds also run that checkout's hub in the same states, those
its `hub serve` has: before `--no-access-log` existed the access log is off at
`--log-level WARNING` (its INFO lines filtered), and a sampled state is skipped.
"""

from __future__ import annotations

import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.hub import ROOT
from loadtest.bench.base import _say
from loadtest.bench.getuser import GetUserSection
from loadtest.bench.procs import BenchError, serve_help
from loadtest.bench.report import SKIPPED, Row

_INFO = ("--log-level", "INFO")


@dataclass(frozen=True)
class LogState:
    key: str  # off, text, json, sampled
    label: str
    flags: tuple[str, ...]
    missing: str = ""  # why this checkout's hub cannot run it


@dataclass(frozen=True)
class Tree:
    """A checkout whose hub is measured: this one ("") or the --access-log-before one."""

    name: str
    source: Path

    @property
    def suffix(self) -> str:
        return f" [{self.name}]" if self.name else ""


def log_states(help_text: str, sample: float) -> list[LogState]:
    """The states the access log is measured in, for a `hub serve` whose --help is
    `help_text` (an older checkout may lack --no-access-log and --access-log-sample)."""
    if "--no-access-log" in help_text:
        off = LogState("off", "access log off (--no-access-log)", (*_INFO, "--no-access-log"))
    else:  # before the flag: the access log writes at INFO, so WARNING silences it
        off = LogState("off", "access log off (--log-level WARNING)", ("--log-level", "WARNING"))
    percent = f"{sample * 100:g}%"
    return [
        off,
        LogState("text", "access log on, text", (*_INFO, "--log-format", "text")),
        LogState("json", "access log on, JSON", (*_INFO, "--log-format", "json")),
        LogState("sampled", f"access log sampled {percent}, text",
                 (*_INFO, "--log-format", "text", "--access-log-sample", f"{sample:g}"),
                 missing="" if "--access-log-sample" in help_text
                 else "this checkout's hub serve has no --access-log-sample"),
    ]


def describe(source: Path) -> str:
    """`before: <short commit>` of a checkout, or its directory when git cannot say."""
    try:
        done = subprocess.run(["git", "-C", str(source), "log", "-1", "--format=%h"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return f"before: {source}"
    return f"before: {done.stdout.strip() or source}"


class AccessLogSection(GetUserSection):
    async def run_access_log(self) -> None:
        p = self.plan
        trees = [Tree("", ROOT)]
        if self.before is not None:
            trees.append(Tree(describe(self.before), self.before))
        states = {t.name: log_states(serve_help(t.source), p.access_log_sample) for t in trees}
        # State by state, each tree in turn: before and after of one state run side by side.
        order = [(t, states[t.name][n]) for n in range(len(states[""])) for t in trees
                 if not states[t.name][n].missing]
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {
            (t.name, s.key): [] for t in trees for s in states[t.name]}
        errors: dict[tuple[str, str], str] = {}
        for round_ in range(p.access_log_rounds):
            shift = round_ % len(order)
            for tree, state in order[shift:] + order[:shift]:
                key = (tree.name, state.key)
                if key in errors:  # failed once: its row says why; the others go on
                    continue
                _say(f"  round {round_ + 1}/{p.access_log_rounds}: {state.label}{tree.suffix}")
                result, error = await self.attempt(state.key, self._logged_run(tree, state))
                if result is None:
                    errors[key] = error
                else:
                    runs[key].append(result)
        for n in range(len(states[""])):  # before beside after, state by state
            for tree in trees:
                state = states[tree.name][n]
                self.rows.append(_row(tree, state, runs[(tree.name, state.key)],
                                      errors.get((tree.name, state.key), ""),
                                      runs[(tree.name, "off")] if state.key != "off" else []))

    async def _logged_run(self, tree: Tree, state: LogState) -> dict[str, Any]:
        """One GetUser load against a fresh hub in `state`; with what it wrote to its log per
        call and the hub's CPU per call."""
        async with self.hubs(f"access-log {state.key}{tree.suffix}", 1, 1, flags=state.flags,
                             source=tree.source) as hubs:
            ids, _ = await self._seed_users(hubs[0].target, self.plan.getuser_users)
            log = hubs[0].log
            offset = log.stat().st_size
            result = await self._unary_load(hubs[0].target, ids, raw=False, hubs=hubs)
            with log.open("rb") as f:  # flushed per record (logging.StreamHandler)
                f.seek(offset)
                written = f.read()
        if result["errors"]:
            raise BenchError(f"GetUser: {result['errors']:,} failed calls, first:"
                             f" {result['first_errors'][:2]}")
        calls = max(result["calls"], 1)
        hub_cpu = result["cpu"].get("hub A")
        return {**result,
                "hub_us_per_call": round(hub_cpu / 100 / result["per_s"] * 1e6, 1)
                if hub_cpu and result["per_s"] else None,
                "log_bytes_per_call": round(len(written) / calls, 1),
                "log_lines_per_call": round(written.count(b"\n") / calls, 4)}


def _row(tree: Tree, state: LogState, runs: list[dict[str, Any]], error: str,
         off: list[dict[str, Any]]) -> Row:
    """The state's best run beside the best run of the same hub with the access log off (for
    the off state itself: no ceiling); the note has every run and the per-round ratios."""
    row = Row("access-log", f"GetUser requests/s, {state.label}{tree.suffix}", unit="req/s",
              workers=1, ceiling_label="access log off" if off else "")
    row.details = {"state": state.key, "tree": tree.name or "this checkout",
                   "source": str(tree.source), "flags": list(state.flags), "runs": runs,
                   "chart_label": f"GetUser, {state.key}{tree.suffix} vs off"}
    if state.missing:
        row.status, row.note = SKIPPED, f"skipped: {state.missing}"
        return row
    row.fail("hub", error)
    if not runs:
        return row
    best = max(runs, key=lambda r: r["per_s"])
    row.hub = best["per_s"]
    us = best["hub_us_per_call"]
    row.hub_text = (f"{best['per_s']:,.0f} req/s; hub CPU {_us(us)}/call; p50"
                    f" {best['p50_ms']:.1f} ms, p99 {best['p99_ms']:.1f} ms")
    row.cpu(best["cpu"])
    rates = ", ".join(f"{r['per_s']:,.0f}" for r in runs)
    cpu = ", ".join(_us(r["hub_us_per_call"]) for r in runs)
    latency = ", ".join(f"{r['p50_ms']:.1f}/{r['p99_ms']:.1f}" for r in runs)
    notes = [f"runs {rates} req/s", f"hub CPU/call {cpu}", f"p50/p99 {latency} ms",
             f"log {best['log_bytes_per_call']:,.1f} B and {best['log_lines_per_call']:.3f}"
             " lines per call"]
    if off:
        best_off = max(off, key=lambda r: r["per_s"])
        row.ceiling = best_off["per_s"]
        paired = [r["per_s"] / o["per_s"] for r, o in zip(runs, off, strict=False)
                  if o["per_s"]]
        if paired:
            notes.append("each round against its off run "
                         + ", ".join(f"{ratio:.0%}" for ratio in paired)
                         + f" (median {statistics.median(paired):.0%})")
        if us is not None and best_off["hub_us_per_call"] is not None:
            notes.append(f"hub CPU {us - best_off['hub_us_per_call']:+.0f} µs/call against"
                         " off")
    row.note = "; ".join(notes)
    return row.done()


def _us(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} µs"
