"""The bench's outputs: rows, the Markdown table, bench.json and the latency chart.

One `Row` per figure a reader checks: what was measured, the hub's figure, the ceiling
measured beside it in the same run, their ratio, the target and whether it was met, and how
busy the load generators and the machine were while it was measured (so a reader sees
whether the clients, not the hub, set the figure).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.bench.plan import BULK_TARGET_RATIO, GETUSER_TARGET_RATIO

OK, ERROR, SKIPPED = "ok", "error", "skipped"
_SATURATED = 85.0  # % of one core: a client process this busy may be the limit


@dataclass
class Row:
    section: str
    measurement: str
    unit: str = ""
    workers: int | None = None  # hub processes per instance
    hub: float | None = None  # the primary figure (for latency rows: p99 in ms)
    hub_text: str = ""  # how the table shows it, when one number is not enough
    ceiling: float | None = None
    ceiling_label: str = ""
    ratio: float | None = None  # hub / ceiling
    target: str = ""
    met: bool | None = None  # None: no target for this row
    status: str = OK
    error: str = ""
    clients_cpu: float | None = None  # load generators, sum, % of one core (hub run)
    busiest_client: float | None = None  # the busiest single load generator, % of one core
    machine_busy: float | None = None  # % of all cores (hub run)
    ceiling_clients_cpu: float | None = None
    ceiling_busiest_client: float | None = None
    ceiling_machine_busy: float | None = None
    servers_cpu: dict[str, float] = field(default_factory=dict)  # hubs, redis, raw servers
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def fail(self, part: str, message: str) -> None:
        """Marks the row failed (when there is a message), saying which half failed."""
        if message:
            self.status = ERROR
            self.error = f"{self.error}; {part}: {message}" if self.error else \
                f"{part}: {message}"

    def done(self) -> Row:
        """Fills the ratio once both figures are in."""
        if self.hub is not None and self.ceiling:
            self.ratio = self.hub / self.ceiling
        return self

    def cpu(self, cpu: dict[str, float], ceiling: dict[str, float] | None = None) -> None:
        """Takes the CPU figures of the hub run (and of the ceiling run) from CpuMeter.percent."""
        self.clients_cpu = cpu.get("clients (sum)")
        self.busiest_client = cpu.get("busiest client")
        self.machine_busy = cpu.get("system busy (% of all cores)")
        self.servers_cpu = {k: v for k, v in cpu.items()
                            if k.startswith(("hub", "redis", "raw server"))}
        if ceiling:
            self.ceiling_clients_cpu = ceiling.get("clients (sum)")
            self.ceiling_busiest_client = ceiling.get("busiest client")
            self.ceiling_machine_busy = ceiling.get("system busy (% of all cores)")
            self.servers_cpu |= {f"ceiling run: {k}": v for k, v in ceiling.items()
                                 if k.startswith(("redis", "raw server"))}


def _num(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "KB":
        return f"{value:,.1f} KB"
    if abs(value) >= 100:
        return f"{value:,.0f}{' ' + unit if unit else ''}"
    return f"{value:,.2f}{' ' + unit if unit else ''}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}%"


def _result(row: Row) -> str:
    if row.status == ERROR:
        return "**ERROR**" if row.hub is None else "**ERROR** (see notes)"
    if row.status == SKIPPED:
        return "skipped"
    if row.met is None:
        return "(no target)"
    return "met" if row.met else "**missed**"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def markdown(rows: Sequence[Row], machine: dict[str, Any], notes: Sequence[str]) -> str:
    cores = int(machine.get("nproc", 1)) * 100
    lines = [
        "# hub bench",
        "",
        f"Machine: {machine.get('nproc')} cores, {machine.get('cpu')}, Python"
        f" {machine.get('python')}, Redis {machine.get('redis_version', '?')}; everything"
        " (Redis, hubs, ceilings and clients) on this one machine. Ceilings ran in the same"
        " run, on the same machine, with the same client code.",
        "",
        f"| measurement | workers | hub | ceiling | hub/ceiling | target | result"
        f" | clients CPU (of {cores}%) | machine busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        hub = row.hub_text or _num(row.hub, row.unit)
        if row.status == ERROR and row.hub is None:
            hub = f"error: {row.error[:160]}"
        elif row.status == SKIPPED:
            hub = row.note or row.error or "skipped"
        ceiling = _num(row.ceiling, row.unit)
        if row.ceiling is not None and row.ceiling_label:
            ceiling += f" ({row.ceiling_label})"
        ratio = "—" if row.ratio is None else f"{row.ratio:.0%}" if row.unit != "KB" \
            else f"{row.ratio:.2f}x"
        clients = _pct(row.clients_cpu)
        if row.busiest_client is not None:
            clients += f" (max {row.busiest_client:.0f}% one process)"
        if row.ceiling_clients_cpu is not None:
            clients += f"; ceiling run {row.ceiling_clients_cpu:.0f}%"
            if row.ceiling_busiest_client is not None:
                clients += f" (max {row.ceiling_busiest_client:.0f}%)"
        busy = _pct(row.machine_busy)
        if row.ceiling_machine_busy is not None:
            busy += f"; ceiling run {row.ceiling_machine_busy:.0f}%"
        workers = "—" if row.workers is None else str(row.workers)
        lines.append("| " + " | ".join(_cell(c) for c in (
            row.measurement, workers, hub, ceiling, ratio, row.target or "—", _result(row),
            clients, busy)) + " |")
    lines += ["", "## Notes", ""]
    for row in rows:
        label = row.measurement + (f" ({row.workers}w)" if row.workers else "")
        if row.status == ERROR:
            lines.append(f"- **{label}**: {row.error}")
        if row.status == SKIPPED:
            continue
        servers = ", ".join(f"{k} {v:.0f}%" for k, v in row.servers_cpu.items())
        text = "; ".join(t for t in (row.note, f"CPU (% of one core): {servers}"
                                     if servers else "") if t)
        if text:
            lines.append(f"- {label}: {text}")
    lines += [f"- {note}" for note in notes]
    lines += _headroom(rows)
    return "\n".join(lines) + "\n"


def _headroom(rows: Sequence[Row]) -> list[str]:
    """Where the load generators, not the server, may have set the figure."""
    out = []
    for row in rows:
        label = row.measurement + (f" ({row.workers}w)" if row.workers else "")
        for run, busiest in (("hub run", row.busiest_client),
                             ("ceiling run", row.ceiling_busiest_client)):
            if busiest is not None and busiest >= _SATURATED:
                out.append(f"- Client-bound? {label}, {run}: one load-generator process used"
                           f" {busiest:.0f}% of a core, so that figure may be the client's"
                           " limit rather than the server's.")
    busy = [row for row in rows if row.machine_busy is not None and row.machine_busy >= 95]
    if busy:
        out.append(f"- {len(busy)} of {len(rows)} rows ran with the machine >= 95% busy: the"
                   " hubs, Redis and the clients shared the cores, so a faster hub would also"
                   " have meant slower clients. On this machine the ratios are the signal.")
    return out


def latency_chart(path: Path, curve: Sequence[dict[str, Any]],
                  ratios: Sequence[tuple[str, float, float | None, bool | None]]) -> None:
    """Left: p50/p99/p99.9 write→delivery latency against the achieved write rate, with the
    targets. Right: each throughput figure as a share of its ceiling (label, ratio, target
    ratio if the target is one, met), coloured by its row's target. Always writes a PNG,
    saying so in the chart when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the chart is a file
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), width_ratios=(1.15, 1))
    points = [c for c in curve if c.get("p50") is not None]
    if points:
        x = [c["achieved_rate"] or c["rate"] for c in points]
        for key, style in (("p50", "o-"), ("p99", "s-"), ("p99.9", "^-")):
            left.plot(x, [c[key] for c in points], style, label=key)
        for c, xi in zip(points, x, strict=True):
            left.annotate(f"target {c['rate']:.0f}/s", (xi, c["p50"]), textcoords="offset points",
                          xytext=(4, -12), fontsize=7, color="grey")
        left.axhline(2.0, color="tab:blue", linestyle="--", linewidth=0.8,
                     label="p50 target at 200 w/s (2 ms)")
        left.axhline(5.0, color="tab:orange", linestyle="--", linewidth=0.8,
                     label="p99 target at 200 w/s (5 ms)")
        left.set_xscale("log")
        left.set_yscale("log")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 200, not 2x10^2
        left.set_xticks(x)
        left.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        left.xaxis.set_minor_formatter(ticker.NullFormatter())
        left.yaxis.set_major_formatter(plain)
        left.legend(fontsize=8, loc="upper left")
    else:
        left.text(0.5, 0.5, "latency not measured in this run", ha="center", va="center",
                  transform=left.transAxes)
    left.set_xlabel("writes/s achieved (paced writer, 20 subscribers on 2 instances)")
    left.set_ylabel("write → delivery latency (ms)")
    left.set_title("Sync delivery latency against load")
    left.grid(True, which="both", alpha=0.3)

    if ratios:
        labels = [r[0] for r in ratios]
        values = [r[1] * 100 for r in ratios]
        colors = ["tab:grey" if met is None else "tab:green" if met else "tab:red"
                  for _, _, _, met in ratios]
        bars = right.barh(range(len(ratios)), values, color=colors)
        for i, (_, _, target, _) in enumerate(ratios):
            if target is not None:
                right.plot([target * 100, target * 100], [i - 0.45, i + 0.45], color="black",
                           linewidth=2)
        right.bar_label(bars, labels=[f"{v:.0f}%" for v in values], fontsize=8, padding=2)
        right.set_yticks(range(len(ratios)), labels=labels, fontsize=8)
        right.invert_yaxis()
        right.set_xlim(0, max(110.0, max(values) * 1.15))
    else:
        right.text(0.5, 0.5, "no throughput figure in this run", ha="center", va="center",
                   transform=right.transAxes)
    right.set_xlabel("hub as % of its ceiling\nbar: the row's target met (green), missed (red),"
                     " none (grey); black line: a ratio target", fontsize=8)
    right.set_title("Throughput against ceilings measured in the same run")
    right.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the run's outputs ------------------------------------------------------------------------


@dataclass
class Report:
    rows: list[Row]
    machine: dict[str, Any]
    settings: dict[str, Any]
    latency_curve: list[dict[str, Any]]
    hub_logs: dict[str, list[str]]
    notes: list[str]
    seconds: float


def write_outputs(report: Report, out: Path) -> int:
    """bench.json, bench.md and latency.png in `out`, the table on stdout; the exit status."""
    failed = [r for r in report.rows if r.status == ERROR]
    code = 1 if failed else 0
    notes = [*report.notes,
             f"Run took {report.seconds:.0f} s. Figures from one machine running Redis, the"
             " hubs, the ceilings and every client at once: compare ratios, not absolutes."]
    table = markdown(report.rows, report.machine, notes)
    sections: dict[str, Any] = {}
    for row in report.rows:
        entry = sections.setdefault(row.section, {"status": OK, "errors": [], "rows": []})
        entry["rows"].append(asdict(row))
        if row.status == ERROR:
            entry["status"] = ERROR
            entry["errors"].append(f"{row.measurement}: {row.error}")
        elif row.status == SKIPPED and entry["status"] == OK and \
                all(r["status"] == SKIPPED for r in entry["rows"]):
            entry["status"] = SKIPPED
    document = {
        "version": 1, "exit_code": code, "seconds": report.seconds,
        "machine": report.machine, "settings": report.settings,
        "sections": sections, "latency_curve": report.latency_curve,
        "hub_logs": report.hub_logs,
    }
    (out / "bench.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    (out / "bench.md").write_text(table)
    latency_chart(out / "latency.png", report.latency_curve, [
        (_chart_label(r), r.ratio, _target_ratio(r), r.met) for r in report.rows
        if r.ratio is not None and r.unit != "KB" and r.status != SKIPPED])
    print(table)
    print(f"bench: wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'latency.png'}",
          file=sys.stderr)
    if failed:
        print(f"bench: {len(failed)} measurement(s) failed: "
              + "; ".join(f"{r.measurement}: {r.error.splitlines()[0] if r.error else ''}"
                          for r in failed), file=sys.stderr)
    return code


def _chart_label(row: Row) -> str:
    if "chart_label" in row.details:
        return str(row.details["chart_label"])
    against = {"bulk": "raw stream" if "raw" in row.ceiling_label else "Redis",
               "import": "Redis", "fanout": "raw stream", "getuser": "raw unary"}
    return f"{row.section} {row.workers}w vs {against.get(row.section, 'ceiling')}"


def _target_ratio(row: Row) -> float | None:
    return {"bulk": BULK_TARGET_RATIO, "getuser": GETUSER_TARGET_RATIO}.get(row.section) \
        if row.target and "%" in row.target else None
