"""Locust scenarios for hub: a CRUD mix, bulk producers and Sync subscribers.

Locust runs every simulated user as a greenlet, so the clients here use grpcio's sync API
made cooperative by `grpc.experimental.gevent.init_gevent()` (locust has already
monkey-patched the standard library by the time it imports this file). Each user has its own
channel and TCP connection, as separate clients would.

Scenarios (pick them by class name after the options; with none named, all three run,
weighted 3 : 1 : 1):

- `CrudUser`: GetUser (6), UpdateUser (3) and CreateUser (1) on users it created itself (a
  pool of at most --crud-pool ids, seeded with --crud-seed creates on start). Emails are unique
  per run. NOT_FOUND for an id it created is a failure (nothing in this file deletes), and the
  id leaves the pool.
- `BulkProducer`: one BulkCreateUsers call per task streaming --bulk-rows creates; one row
  "BulkCreateUsers" per call (response time: the whole call; content size: rows sent). A call
  with refused rows is a failure.
- `SyncSubscriber`: one long-lived Sync stream (all users) per locust user, read by its own
  greenlet. Every --sync-interval seconds the user reports what it received since its last
  report, as rows of type "sync" (one row of each per stream and interval, never one per
  message):
    * "Sync events": response time = this stream's events/s over the interval (a rate, not
      ms); content size = events received in the interval. So the row's Average Response Time
      is the mean per-stream rate, and Request Count x Average Content Size is every event
      delivered (divide by the run time for events/s over all streams).
    * "Sync delivery latency": response time = the interval's median delivery latency in ms,
      from the event's `written_at` (hub's clock at the write) to its receipt here.
    * "Sync delivery latency p99": the same, the interval's 99th percentile.
  The latency rows' content size is the number of events timed (the interval's, up to
  200,000). They are sent only for intervals that received events, so their percentiles are
  percentiles of per-interval medians (or p99s). A stream that ends (any status but our own
  cancel at stop) is a failure row "Sync" with the status code (response time: how long the
  stream lasted); it then resubscribes with its last resume token (after RESOURCE_EXHAUSTED,
  the one in the `hub-resume-token` trailer), so no event is lost or repeated. Subscribers
  only see events when someone writes: run them with CrudUser or BulkProducer.

Unary and bulk calls are rows of type "grpc" named after the method. A gRPC error is a failure
whose message starts with its status code ("NOT_FOUND: ..."; emails and ids masked, so equal
failures share a row).

Headless runs with CSV (`<prefix>_stats.csv`, `_stats_history.csv`, `_failures.csv`,
`_exceptions.csv`) and HTML reports, against a hub on 127.0.0.1:50051:

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 1m \\
        --host 127.0.0.1:50051 --csv reports/crud --html reports/crud.html CrudUser
    .venv/bin/locust -f loadtest/locustfile.py --headless -u 2 -r 2 -t 1m \\
        --host 127.0.0.1:50051 --bulk-rows 500 --csv reports/bulk --html reports/bulk.html \\
        BulkProducer
    .venv/bin/locust -f loadtest/locustfile.py --headless -u 40 -r 20 -t 1m \\
        --host 127.0.0.1:50051 --csv reports/sync --html reports/sync.html \\
        --config-users='{"user_class_name": "SyncSubscriber", "fixed_count": 10}' \\
        CrudUser SyncSubscriber

(`--config-users` takes any number of values: write it with `=`, or it swallows the class
names.) Locust exits 1 when any request failed. The CSV files are rewritten every second
during the run, so they end with the figures of the last second before the end; the summary
printed at exit, the HTML report and `--json-file` hold the final ones.

One locust process uses one core. For more, run a master and one worker per core (workers may
run on other machines); class names, -u, -r, -t, --host and the reports go on the master,
which passes this file's options on to the workers. `--processes -1` does the same on one
machine from one command.

    .venv/bin/locust -f loadtest/locustfile.py --master --headless --expect-workers 2 \\
        -u 400 -r 50 -t 5m --host 127.0.0.1:50051 --csv reports/mix --html reports/mix.html
    .venv/bin/locust -f loadtest/locustfile.py --worker --master-host 127.0.0.1   # x2

Connection options: --host is `host:port`, `grpc://host:port` or `grpcs://host:port` (TLS with
the system's roots); --hub-token (or HUB_LOADTEST_TOKEN) sends a bearer token (over TLS, or
plaintext to loopback only); --hub-tls-ca/--hub-tls-cert/--hub-tls-key give TLS and mTLS
files; --hub-timeout is every call's deadline (for a bulk call, the whole stream).

Caveats: latency measured across machines is only as good as their clock sync (NTP); a
locust process near 100% CPU (locust warns) delays every receive and so inflates every figure;
in distributed runs a subscriber's last, partial interval may not reach the master.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gevent
import gevent.event
import grpc
import grpc.experimental.gevent
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from locust import User, constant, events, task
from locust.env import Environment

from hub.api.user.v1 import (
    common_pb2,
    user_service_pb2,
    user_service_pb2_grpc,
    user_sync_service_pb2,
    user_sync_service_pb2_grpc,
)
from hub.client import Credentials

# Before any channel exists: grpc's completion queue must yield to the gevent hub, or one
# blocked call would stall every user of the process.
grpc.experimental.gevent.init_gevent()

DEFAULT_TARGET = "127.0.0.1:50051"
RESUME_TOKEN_KEY = "hub-resume-token"
# A Sync stream never runs without a deadline; reaching it is a planned resume, not a failure.
SYNC_STREAM_DEADLINE = 3600.0
# Latency samples kept per subscriber per interval; beyond it events are counted, not timed.
MAX_SAMPLES = 200_000
# With the pid, emails stay unique across runs, restarts and workers (`--processes` forks
# after this module is imported, so the forked workers share RUN_ID).
RUN_ID = secrets.token_hex(4)
# Emails and ids in a status message: masked so locust groups equal failures in one row.
_VARYING = re.compile(r"[^\s'\"]+@[^\s'\"]+|\b[0-9A-Z]{26}\b")
# google.rpc.Code numbers (as in BulkCreateError.code) to grpc's enum.
_CODES = {status.value[0]: status for status in grpc.StatusCode}
_serial = itertools.count(1)  # shared by the process's greenlets; next() is atomic under the GIL

Response = TypeVar("Response", bound=Message)


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any, **_: Any) -> None:
    parser.add_argument("--hub-token", default="", env_var="HUB_LOADTEST_TOKEN", is_secret=True,
                        help="bearer token sent on every call")
    parser.add_argument("--hub-tls-ca", default="", help="PEM CA file: use TLS, trusting it")
    parser.add_argument("--hub-tls-cert", default="", help="PEM client certificate (mTLS)")
    parser.add_argument("--hub-tls-key", default="", help="PEM key of --hub-tls-cert")
    parser.add_argument("--hub-timeout", type=float, default=10.0,
                        help="deadline of every unary and bulk call, seconds")
    parser.add_argument("--crud-seed", type=int, default=3,
                        help="users each CrudUser creates on start")
    parser.add_argument("--crud-pool", type=int, default=1000,
                        help="ids each CrudUser keeps to read and update")
    parser.add_argument("--crud-think", type=float, default=0.0,
                        help="CrudUser waits a random 0..N seconds between calls (0: none)")
    parser.add_argument("--bulk-rows", type=int, default=500,
                        help="rows per BulkCreateUsers call")
    parser.add_argument("--sync-interval", type=float, default=1.0,
                        help="seconds between a SyncSubscriber's reports")


@dataclass(frozen=True)
class HubOptions:
    """This file's command-line options, with their defaults when locust runs as a library."""

    token: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    timeout: float = 10.0
    crud_seed: int = 3
    crud_pool: int = 1000
    crud_think: float = 0.0
    bulk_rows: int = 500
    sync_interval: float = 1.0

    @classmethod
    def of(cls, environment: Environment) -> HubOptions:
        parsed, default = environment.parsed_options, cls()
        options = cls(**{
            name: getattr(parsed, option, getattr(default, name))
            for name, option in (
                ("token", "hub_token"), ("tls_ca", "hub_tls_ca"), ("tls_cert", "hub_tls_cert"),
                ("tls_key", "hub_tls_key"), ("timeout", "hub_timeout"),
                ("crud_seed", "crud_seed"), ("crud_pool", "crud_pool"),
                ("crud_think", "crud_think"), ("bulk_rows", "bulk_rows"),
                ("sync_interval", "sync_interval"),
            )
        })
        if options.crud_pool < 1 or options.bulk_rows < 1 or options.sync_interval <= 0:
            raise ValueError("--crud-pool and --bulk-rows must be positive, and so must"
                             " --sync-interval")
        return options


def parse_host(host: str | None) -> tuple[str, bool]:
    """(target, tls) from --host: `host:port`, `grpc://host:port` or `grpcs://host:port`."""
    target, tls = (host or DEFAULT_TARGET).strip().rstrip("/"), False
    scheme, sep, rest = target.partition("://")
    if sep:
        if scheme not in ("grpc", "grpcs"):
            raise ValueError(f"--host {host!r}: use host:port, grpc:// or grpcs://")
        target, tls = rest, scheme == "grpcs"
    return target, tls


def open_channel(host: str | None, options: HubOptions) -> grpc.Channel:
    target, tls = parse_host(host)

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    credentials = Credentials(
        token=options.token, tls=tls, tls_ca=read(options.tls_ca),
        tls_cert=read(options.tls_cert), tls_key=read(options.tls_key),
    ).channel_credentials()
    channel_options = [
        # Equal channels would otherwise share one connection, so all users of a process
        # would be multiplexed on one HTTP/2 connection (and its stream limit).
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ]
    if credentials is None:
        return grpc.insecure_channel(target, options=channel_options)
    return grpc.secure_channel(target, credentials, options=channel_options)


class RpcFailure(Exception):
    """A failed call as locust reports it: the status code first, so failures group by it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        super().__init__(f"{code.name}: {details}")

    @classmethod
    def of(cls, err: grpc.RpcError) -> RpcFailure:
        call: Any = err  # a sync-API RpcError is also the grpc.Call that failed
        return cls(call.code(), _VARYING.sub("<...>", call.details() or ""))


def email(kind: str) -> str:
    return f"locust-{kind}-{RUN_ID}-{os.getpid()}-{next(_serial)}@example.com"


class HubUser(User):
    """A locust user with its own channel to hub, reporting each call as a request event."""

    abstract = True
    host = DEFAULT_TARGET

    def on_start(self) -> None:
        self.options = HubOptions.of(self.environment)
        self.channel = open_channel(self.host, self.options)
        self.users = user_service_pb2_grpc.UserServiceStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def report(self, name: str, started: float, length: int,
               exception: Exception | None = None, request_type: str = "grpc") -> None:
        self.environment.events.request.fire(
            request_type=request_type, name=name,
            response_time=(time.perf_counter() - started) * 1000, response_length=length,
            exception=exception, context={},
        )

    def call(self, name: str, method: Callable[..., Response], request: Message,
             ) -> tuple[Response | None, RpcFailure | None]:
        """Calls `method`, reports it, and returns (response, None) or (None, failure)."""
        started = time.perf_counter()
        try:
            response = method(request, timeout=self.options.timeout)
        except grpc.RpcError as err:
            failure = RpcFailure.of(err)
            self.report(name, started, 0, failure)
            return None, failure
        self.report(name, started, response.ByteSize())
        return response, None


class IdPool:
    """At most `size` ids; once full, a new id replaces the oldest. O(1) add and pick."""

    def __init__(self, size: int) -> None:
        self._ids: list[str] = []
        self._size = size
        self._next = 0

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, user_id: str) -> None:
        if len(self._ids) < self._size:
            self._ids.append(user_id)
        else:
            self._ids[self._next] = user_id
            self._next = (self._next + 1) % self._size

    def pick(self) -> str:
        return random.choice(self._ids)

    def discard(self, user_id: str) -> None:
        if user_id in self._ids:
            self._ids.remove(user_id)
            self._next = 0  # the ring's order no longer matters once an id is gone


class CrudUser(HubUser):
    weight = 3

    def wait_time(self) -> float:
        return random.uniform(0, self.options.crud_think)

    def on_start(self) -> None:
        super().on_start()
        self.pool = IdPool(self.options.crud_pool)
        for _ in range(self.options.crud_seed):
            self.create()

    @task(1)
    def create(self) -> None:
        request = user_service_pb2.CreateUserRequest(
            email=email("crud"), name="Locust user", status=common_pb2.USER_STATUS_ACTIVE)
        user, _ = self.call("CreateUser", self.users.CreateUser, request)
        if user is not None:
            self.pool.add(user.id)

    @task(6)
    def get(self) -> None:
        if not self.pool:
            self.create()
            return
        user_id = self.pool.pick()
        _, failure = self.call("GetUser", self.users.GetUser,
                               user_service_pb2.GetUserRequest(user_id=user_id))
        self._forget_if_gone(user_id, failure)

    @task(3)
    def update(self) -> None:
        if not self.pool:
            self.create()
            return
        user_id = self.pool.pick()
        request = user_service_pb2.UpdateUserRequest(
            user=common_pb2.User(id=user_id, name=f"Renamed {next(_serial)}"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]))
        _, failure = self.call("UpdateUser", self.users.UpdateUser, request)
        self._forget_if_gone(user_id, failure)

    def _forget_if_gone(self, user_id: str, failure: RpcFailure | None) -> None:
        # The failure is already reported; asking about the id again would only repeat it.
        if failure is not None and failure.code == grpc.StatusCode.NOT_FOUND:
            self.pool.discard(user_id)


class BulkProducer(HubUser):
    weight = 1
    wait_time = constant(0)

    @task
    def bulk_create(self) -> None:
        rows = [
            user_service_pb2.CreateUserRequest(email=email("bulk"), name="Locust bulk user")
            for _ in range(self.options.bulk_rows)
        ]  # built before the clock starts: we time hub, not protobuf constructors
        started = time.perf_counter()
        try:
            response = self.users.BulkCreateUsers(iter(rows), timeout=self.options.timeout)
        except grpc.RpcError as err:
            self.report("BulkCreateUsers", started, len(rows), RpcFailure.of(err))
            return
        failure = None
        if response.errors:
            first = response.errors[0]
            # The count stays out of the message, so that failures group by cause.
            failure = RpcFailure(_CODES.get(first.code, grpc.StatusCode.UNKNOWN),
                                 "rows refused, the first: "
                                 + _VARYING.sub("<...>", first.message))
        self.report("BulkCreateUsers", started, len(rows), failure)


class SyncStream:
    """One Sync stream (all users) that resumes by itself, tallying what it receives.

    `run` reads in its own greenlet until `stop`; `flush` reports the tally since the last
    flush and starts a new one.
    """

    def __init__(self, user: HubUser) -> None:
        self._user = user
        self._stub = user_sync_service_pb2_grpc.UserSyncServiceStub(user.channel)
        self._stopped = gevent.event.Event()
        self._call: Any = None  # the stream in progress (a grpc.Call and response iterator)
        self.token = ""
        self._events = 0
        self._latencies_ms: list[float] = []
        self._since = time.monotonic()

    def run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            started = time.perf_counter()
            subscribe = user_sync_service_pb2.SyncRequest(
                subscribe=common_pb2.Subscribe(resume_token=self.token))
            # One request, then half-close: hub keeps the subscription and the stream open.
            self._call = self._stub.Sync(iter([subscribe]), timeout=SYNC_STREAM_DEADLINE)
            if self._stopped.is_set():  # stop() ran while the call was being started
                self._call.cancel()
            try:
                for response in self._call:
                    failures = 0
                    self._receive(response)
                failure = RpcFailure(grpc.StatusCode.OK, "the server ended the stream")
            except grpc.RpcError as err:
                if self._stopped.is_set():
                    return
                failure = RpcFailure.of(err)
                if failure.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                self._adopt_token(err, failure.code)
            self._user.report("Sync", started, 0, failure)
            failures += 1
            # Capped backoff: a hub that is down must not turn into a busy loop of failures.
            self._stopped.wait(min(2.0, 0.05 * 2 ** min(failures, 6)))

    def _receive(self, response: user_sync_service_pb2.SyncResponse) -> None:
        now_ns = time.time_ns()
        self._events += len(response.events)
        for event in response.events:
            if event.HasField("written_at") and len(self._latencies_ms) < MAX_SAMPLES:
                written = event.written_at
                self._latencies_ms.append(
                    (now_ns - written.seconds * 1_000_000_000 - written.nanos) / 1e6)
        if response.resume_token:  # heartbeats (no events) carry a fresh one too
            self.token = response.resume_token

    def _adopt_token(self, err: grpc.RpcError, code: grpc.StatusCode) -> None:
        call: Any = err
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # Cut for falling behind: the trailer says how far we got, past the last response.
            for key, value in call.trailing_metadata() or ():
                if key == RESUME_TOKEN_KEY and value:
                    self.token = str(value)
        elif code == grpc.StatusCode.OUT_OF_RANGE:
            self.token = ""  # the history no longer reaches the token: start afresh (a gap)

    def flush(self) -> None:
        now = time.monotonic()
        elapsed, self._since = now - self._since, now
        events, self._events = self._events, 0
        latencies, self._latencies_ms = sorted(self._latencies_ms), []
        report = self._user.environment.events.request.fire
        report(request_type="sync", name="Sync events",
               response_time=events / elapsed if elapsed > 0 else 0.0,
               response_length=events, exception=None, context={})
        if latencies:
            for name, fraction in (("Sync delivery latency", 0.5),
                                   ("Sync delivery latency p99", 0.99)):
                report(request_type="sync", name=name,
                       response_time=latencies[int(fraction * (len(latencies) - 1))],
                       response_length=len(latencies), exception=None, context={})

    def stop(self) -> None:
        self._stopped.set()
        if self._call is not None:
            self._call.cancel()


class SyncSubscriber(HubUser):
    weight = 1
    wait_time = constant(0)  # the task paces itself: one report per --sync-interval

    def on_start(self) -> None:
        super().on_start()
        self.stream = SyncStream(self)
        self.reader = gevent.spawn(self.stream.run)
        self.reader.link_exception(self._reader_died)

    def _reader_died(self, reader: gevent.Greenlet) -> None:
        # A bug, not a stream error: make the run fail loudly instead of going quiet.
        exception = reader.exception
        self.report("Sync", time.perf_counter(), 0,
                    exception if isinstance(exception, Exception) else RuntimeError("died"))

    @task
    def report_interval(self) -> None:
        gevent.sleep(self.options.sync_interval)
        self.stream.flush()

    def on_stop(self) -> None:
        self.stream.stop()
        self.reader.join(timeout=5)
        self.stream.flush()  # the last, partial interval: the event total stays exact
        super().on_stop()

