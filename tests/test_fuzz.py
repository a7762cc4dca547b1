"""Property-based fuzzing of every RPC: whatever a client sends, the hub answers with a
deliberate status (never INTERNAL or UNKNOWN, never a hang) and keeps serving.

One `python -m hub serve` (embedded in-memory store) serves the whole module; the tests talk
to it with the blocking gRPC API, so hypothesis' @given drives them directly. Examples are
derandomized (the same on every run) and bounded: see EXAMPLES.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.hub import HubProcess
from hub import resume
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1 import user_sync_service_pb2 as spb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.domain import Position
from hub.resume import RESUME_TOKEN_KEY

# Examples per test; each RPC test below sends this many requests (streams: this many streams).
EXAMPLES = {"unary": 300, "list": 150, "bulk": 100, "stream": 150, "raw": 60}
FUZZ = settings(
    deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
# Statuses that mean the server did not decide the outcome: a bug, or a hang.
NOT_DELIBERATE = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                  grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT = 10.0
PARTITIONS = 16  # the serve default
SERVICE = "/user.v1.UserService/"
SYNC = "/user.v1.UserSyncService/Sync"

# What was sent and how it ended, per RPC: {rpc: Counter({code name: calls})}.
VOLUME: dict[str, Counter[str]] = {}


def record(rpc: str, code: grpc.StatusCode, suffix: str = "") -> None:
    VOLUME.setdefault(rpc, Counter())[code.name + suffix] += 1


class Known:
    """Values taken from the live server, so fuzzed requests also hit existing users and
    real resume tokens, not only garbage."""

    ids: ClassVar[list[str]] = []
    emails: ClassVar[list[str]] = []
    epoch: ClassVar[str] = ""


@pytest.fixture(scope="module")
def fuzz_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """`python -m hub serve` for the module (hypothesis runs many examples per test, so the
    function-scoped hub_process fixture does not fit)."""
    hub = HubProcess(tmp_path_factory.mktemp("fuzz"),
                     env={"HUB_LOG_FORMAT": "json", "HUB_WRITE_RATE": "0"})
    try:
        hub.start()
        with grpc.insecure_channel(hub.target) as channel:
            stub = UserServiceStub(channel)
            for i in range(30):
                user = stub.CreateUser(pb.CreateUserRequest(email=f"known{i}@example.com",
                                                            name=f"Known {i}"), timeout=5)
                Known.ids.append(user.id)
                Known.emails.append(user.email)
            call = stub.ListUsers(pb.ListUsersRequest(), timeout=5)
            list(call)
            token = dict(call.trailing_metadata() or ())[RESUME_TOKEN_KEY]
            Known.epoch = resume.decode(token, PARTITIONS).epoch
        yield hub
    finally:
        hub.kill()


@pytest.fixture(scope="module")
def channel(fuzz_hub: HubProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_hub.target) as ch:
        yield ch


# -- strategies -----------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
ULID_CHARS = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ids = st.one_of(
    st.deferred(lambda: st.sampled_from(Known.ids)),
    st.text(ULID_CHARS, min_size=26, max_size=26),  # well-formed, mostly unknown or overflowing
    st.text(ULID_CHARS + "ilou", min_size=25, max_size=27),
    st.deferred(lambda: st.sampled_from(Known.ids)).map(str.lower),
    st.just(""),
    TEXT,
)
labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=70)
emails = st.one_of(
    st.deferred(lambda: st.sampled_from(Known.emails)),
    st.builds(lambda local, domain, tld: f"{local}@{domain}.{tld}",
              st.text("abcXYZ019.+_-!#", min_size=1, max_size=70), labels,
              st.sampled_from(["com", "io", "x", "c0m", ""])),
    st.builds(lambda n, m: "a" * n + "@" + ".".join(["b" * 60] * m) + ".com",
              st.integers(1, 70), st.integers(1, 4)),  # around the 254 and 64 limits
    st.just(""),
    TEXT,
)
names = st.one_of(
    TEXT,
    st.text(st.characters(exclude_categories=("Cs",)), min_size=195, max_size=205),
    st.sampled_from(["", "Ada\x00", "tab\there", "\x7f", "🙂" * 200, "é" * 201]),
)
passwords = st.one_of(st.just(""), TEXT.map(lambda t: t[:12]),
                      st.sampled_from(["long enough", "x" * 1024, "x" * 1025]))
offsets = st.integers(0, 2**64 - 1)


def _token(epoch: str, offs: list[int]) -> str:
    return resume.encode(Position(epoch, tuple(offs)))


resume_tokens = st.one_of(
    st.just(""),
    TEXT,
    st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    # Well-formed tokens: this history's epoch or another, offsets small or absurd,
    # the right partition count or not.
    st.builds(_token, st.one_of(st.deferred(lambda: st.just(Known.epoch)), TEXT),
              st.lists(st.one_of(st.integers(0, 20), offsets), min_size=PARTITIONS,
                       max_size=PARTITIONS)),
    st.builds(_token, st.deferred(lambda: st.just(Known.epoch)),
              st.lists(st.integers(0, 5), max_size=20)),
)
mask_paths = st.one_of(
    st.sampled_from(["email", "name", "status", "*", "id", "version", "created_at",
                     "user.email", "", "EMAIL", "name,email", "deleted_at"]),
    TEXT)
int32 = st.one_of(st.sampled_from([0, 1, 2, 3, -1]), st.integers(-(2**31), 2**31 - 1))
int64 = st.one_of(st.sampled_from([0, 1, 2, -1]), st.integers(-(2**63), 2**63 - 1))

# Fields fuzzed with values that mean something to the hub (besides arbitrary ones).
BY_NAME: dict[str, st.SearchStrategy[Any]] = {
    "user_id": ids, "id": ids, "page_token": ids, "user_ids": ids,
    "email": emails, "name": names, "password": passwords,
    "resume_token": resume_tokens, "paths": mask_paths,
    "page_size": st.one_of(st.sampled_from([0, 1, 2, 1000, 1001, -1]), int32),
}

F = pb_descriptor.FieldDescriptor
SCALARS: dict[int, st.SearchStrategy[Any]] = {
    F.TYPE_STRING: TEXT, F.TYPE_BYTES: st.binary(max_size=40), F.TYPE_BOOL: st.booleans(),
    F.TYPE_INT32: int32, F.TYPE_SINT32: int32, F.TYPE_SFIXED32: int32, F.TYPE_ENUM: int32,
    F.TYPE_INT64: int64, F.TYPE_SINT64: int64, F.TYPE_SFIXED64: int64,
    F.TYPE_UINT32: st.integers(0, 2**32 - 1), F.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    F.TYPE_UINT64: st.integers(0, 2**64 - 1), F.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    F.TYPE_FLOAT: st.floats(width=32), F.TYPE_DOUBLE: st.floats(),
}


def messages(descriptor: pb_descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Any message of this type: each field set or not (oneofs: any member or none), with
    values from BY_NAME or the field's whole type range."""
    cls = message_factory.GetMessageClass(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            value = messages(field.message_type, depth + 1)
        else:
            value = BY_NAME.get(field.name, SCALARS[field.type])
        if field.is_repeated:
            # Mostly short lists; sometimes one big enough to pass configured limits.
            value = st.one_of(st.lists(value, max_size=5), st.lists(value, max_size=60))
        fields[field.name] = value

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, v in values.items():
            field = descriptor.fields_by_name[name]
            if field.is_repeated:
                if field.type == F.TYPE_MESSAGE:
                    for item in v:
                        getattr(message, name).add().CopyFrom(item)
                else:
                    getattr(message, name).extend(v)
            elif field.type == F.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(v)
            else:
                setattr(message, name, v)  # a later oneof member replaces an earlier one
        return message

    return st.fixed_dictionaries({}, optional=fields).map(build)


# Plausible requests: mostly valid, so the fuzzing also reaches the store, the events, the
# snapshots and replays, not only the validation.
valid_ids = st.deferred(lambda: st.sampled_from(Known.ids))
valid_emails = st.builds(lambda local, domain: f"{local}@{domain}.example",
                         st.text("abcdefxyz0189._+", min_size=1, max_size=12)
                         .filter(lambda t: not (t.startswith(".") or t.endswith(".")
                                                or ".." in t)),
                         st.text("abcdefghij0123", min_size=1, max_size=20))
valid_names = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=30)
small_version = st.one_of(st.none(), st.integers(0, 4))
plausible_create = st.builds(
    lambda e, n, pw, status: pb.CreateUserRequest(email=e, name=n, password=pw, status=status),
    valid_emails, valid_names, st.sampled_from(["", "", "", "long enough"]), st.integers(0, 2))


def _update(user_id: str, email: str, name: str, status: int, paths: list[str],
            version: int | None) -> pb.UpdateUserRequest:
    request = pb.UpdateUserRequest(
        user=common_pb2.User(id=user_id, email=email, name=name, status=status),  # type: ignore[arg-type]
        update_mask={"paths": paths})
    if version is not None:
        request.expected_version = version
    return request


def _delete(user_id: str, version: int | None) -> pb.DeleteUserRequest:
    request = pb.DeleteUserRequest(user_id=user_id)
    if version is not None:
        request.expected_version = version
    return request


plausible_update = st.builds(
    _update, valid_ids, valid_emails, valid_names, st.integers(0, 2),
    st.one_of(st.lists(st.sampled_from(["email", "name", "status"]), unique=True),
              st.just(["*"])), small_version)
plausible_delete = st.builds(_delete, valid_ids, small_version)
current_tokens = st.builds(_token, st.deferred(lambda: st.just(Known.epoch)),
                           st.lists(st.integers(0, 3), min_size=PARTITIONS,
                                    max_size=PARTITIONS))
plausible_subscribe = st.builds(
    lambda users, token, snapshot, conflate: common_pb2.Subscribe(
        user_ids=users, resume_token=token, snapshot=snapshot, conflate=conflate),
    st.lists(valid_ids, max_size=3, unique=True), st.one_of(st.just(""), current_tokens),
    st.booleans(), st.booleans())
plausible_change = st.one_of(
    st.builds(lambda r, c: pb.UserChange(request_id=r, create=c), TEXT, plausible_create),
    st.builds(lambda r, u: pb.UserChange(request_id=r, update=u), TEXT, plausible_update),
    st.builds(lambda r, d: pb.UserChange(request_id=r, delete=d), TEXT, plausible_delete),
)
PLAUSIBLE: dict[type[Message], st.SearchStrategy[Any]] = {
    pb.GetUserRequest: st.builds(lambda i: pb.GetUserRequest(user_id=i), valid_ids),
    pb.CreateUserRequest: plausible_create,
    pb.UpdateUserRequest: plausible_update,
    pb.DeleteUserRequest: plausible_delete,
    pb.ListUsersRequest: st.builds(
        lambda size, token: pb.ListUsersRequest(page_size=size, page_token=token),
        st.integers(0, 1000), st.one_of(st.just(""), valid_ids)),
}


def requests(kind: type[Message]) -> st.SearchStrategy[Any]:
    """Half arbitrary messages of the type, half plausible ones."""
    return st.one_of(messages(kind.DESCRIPTOR), PLAUSIBLE[kind])


def changes(kind: type[Message]) -> st.SearchStrategy[Any]:
    """Stream requests: arbitrary, or one of the three kinds (arbitrary or plausible)."""
    return st.one_of(
        messages(kind.DESCRIPTOR),
        st.builds(lambda s: kind(subscribe=s),
                  st.one_of(messages(common_pb2.Subscribe.DESCRIPTOR), plausible_subscribe)),
        st.builds(lambda u: kind(unsubscribe=u), messages(common_pb2.Unsubscribe.DESCRIPTOR)),
        st.builds(lambda c: kind(change=c),
                  st.one_of(messages(pb.UserChange.DESCRIPTOR), plausible_change)),
    )


# -- calling --------------------------------------------------------------------------------


def outcome(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def check(rpc: str, code: grpc.StatusCode, request: Any, suffix: str = "") -> None:
    record(rpc, code, suffix)
    assert code not in NOT_DELIBERATE, f"{rpc} ended {code.name} for {request!r}"


def unary(channel: grpc.Channel, method: str, request: Message) -> grpc.StatusCode:
    call = channel.unary_unary(SERVICE + method, request_serializer=_serialize,
                               response_deserializer=None)
    return outcome(lambda: call(request, timeout=CALL_TIMEOUT))


UNARY = {
    "GetUser": pb.GetUserRequest, "CreateUser": pb.CreateUserRequest,
    "UpdateUser": pb.UpdateUserRequest, "DeleteUser": pb.DeleteUserRequest,
}


@pytest.mark.parametrize("method", list(UNARY))
def test_fuzzed_unary_requests_get_deliberate_statuses(
    channel: grpc.Channel, method: str
) -> None:
    @settings(FUZZ, max_examples=EXAMPLES["unary"])
    @given(request=requests(UNARY[method]))
    def run(request: Message) -> None:
        check(method, unary(channel, method, request), request)

    run()


def test_fuzzed_list_users_requests_get_deliberate_statuses(channel: grpc.Channel) -> None:
    stub = UserServiceStub(channel)

    @settings(FUZZ, max_examples=EXAMPLES["list"])
    @given(request=requests(pb.ListUsersRequest))
    def run(request: pb.ListUsersRequest) -> None:
        check("ListUsers", outcome(lambda: list(stub.ListUsers(request, timeout=CALL_TIMEOUT))),
              request)

    run()


def test_fuzzed_bulk_create_streams_get_deliberate_statuses(channel: grpc.Channel) -> None:
    stub = UserServiceStub(channel)

    @settings(FUZZ, max_examples=EXAMPLES["bulk"])
    @given(rows=st.lists(requests(pb.CreateUserRequest), max_size=20))
    def run(rows: list[pb.CreateUserRequest]) -> None:
        reply: list[pb.BulkCreateResponse] = []
        code = outcome(lambda: reply.append(stub.BulkCreateUsers(iter(rows),
                                                                 timeout=CALL_TIMEOUT)))
        check("BulkCreateUsers", code, rows)
        (response,) = reply
        # Every row is either created or refused, exactly once (refusals are not in row order:
        # invalid rows are reported as read, store refusals when their batch is written).
        assert response.created_count == len(response.user_ids)
        refused = sorted(e.index for e in response.errors)
        assert len(set(refused)) == len(refused) and all(0 <= i < len(rows) for i in refused)
        assert response.created_count + len(refused) == len(rows)

    run()


def test_fuzzed_import_streams_get_deliberate_statuses(channel: grpc.Channel) -> None:
    stub = UserServiceStub(channel)

    @settings(FUZZ, max_examples=EXAMPLES["bulk"])
    @given(batches=st.lists(st.lists(requests(pb.CreateUserRequest), max_size=8), max_size=4))
    def run(batches: list[list[pb.CreateUserRequest]]) -> None:
        messages = [pb.ImportUsersRequest(users=rows) for rows in batches]
        reply: list[pb.BulkCreateResponse] = []
        code = outcome(lambda: reply.append(stub.ImportUsers(iter(messages),
                                                             timeout=CALL_TIMEOUT)))
        check("ImportUsers", code, messages)
        (response,) = reply
        total = sum(len(rows) for rows in batches)
        refused = sorted(e.index for e in response.errors)
        assert len(set(refused)) == len(refused) and all(0 <= i < total for i in refused)
        assert response.created_count + len(refused) == total

    run()


END = "request: names no subscribe, unsubscribe or change"


def stream(channel: grpc.Channel, method: str, kind: type[Message],
           requests: list[Message]) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Sends the requests, then one naming nothing, which the hub refuses: so every stream
    ends by itself once all of them were handled (a stream that does not is a hang)."""
    call = channel.stream_stream(method, request_serializer=_serialize,
                                 response_deserializer=None)
    responses: list[bytes] = []
    try:
        responses.extend(call(iter([*requests, kind()]), timeout=CALL_TIMEOUT))
    except grpc.RpcError as err:
        return err.code(), err.details() or "", responses
    return grpc.StatusCode.OK, "", responses


@pytest.mark.parametrize(("method", "kind"), [
    (SYNC, spb.SyncRequest),
    (SERVICE + "UserUpdates", pb.UserUpdateRequest),
], ids=["Sync", "UserUpdates"])
def test_fuzzed_live_streams_get_deliberate_statuses(
    channel: grpc.Channel, method: str, kind: type[Message]
) -> None:
    rpc = method.rsplit("/", 1)[1]

    @settings(FUZZ, max_examples=EXAMPLES["stream"])
    @given(requests=st.lists(changes(kind), max_size=8))
    def run(requests: list[Message]) -> None:
        code, details, responses = stream(channel, method, kind, requests)
        # "(end)": every request was handled and the closing one refused, as planned.
        check(rpc, code, requests, suffix=" (end)" if details == END else "")
        if kind is spb.SyncRequest:
            for raw in responses:
                response = spb.SyncResponse.FromString(raw)
                VOLUME.setdefault("Sync events", Counter())["events"] += len(response.events)
                for result in response.results:
                    record("Sync change results", _code(result.code))

    run()


def _code(number: int) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == number)


# -- raw bytes ------------------------------------------------------------------------------

METHODS: dict[str, tuple[str, type[Message]]] = {
    "GetUser": ("unary_unary", pb.GetUserRequest),
    "CreateUser": ("unary_unary", pb.CreateUserRequest),
    "UpdateUser": ("unary_unary", pb.UpdateUserRequest),
    "DeleteUser": ("unary_unary", pb.DeleteUserRequest),
    "ListUsers": ("unary_stream", pb.ListUsersRequest),
    "BulkCreateUsers": ("stream_unary", pb.CreateUserRequest),
    "ImportUsers": ("stream_unary", pb.ImportUsersRequest),
    "UserUpdates": ("stream_stream", pb.UserUpdateRequest),
    "Sync": ("stream_stream", spb.SyncRequest),
}


def send_raw(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    """`payload` as the request message, unserialized (identity serializer)."""
    shape = METHODS[method][0]
    path = SYNC if method == "Sync" else SERVICE + method
    make = getattr(channel, shape)
    call = make(path, request_serializer=None, response_deserializer=None)
    if shape == "unary_unary":
        return outcome(lambda: call(payload, timeout=CALL_TIMEOUT))
    if shape == "unary_stream":
        return outcome(lambda: list(call(payload, timeout=CALL_TIMEOUT)))
    if shape == "stream_unary":
        return outcome(lambda: call(iter([payload]), timeout=CALL_TIMEOUT))
    # Live streams: the payload, then an empty request to end the stream (see `stream`).
    return outcome(lambda: list(call(iter([payload, b""]), timeout=CALL_TIMEOUT)))


def parses(kind: type[Message], payload: bytes) -> bool:
    try:
        kind.FromString(payload)
    except DecodeError:
        return False
    return True


raw_payloads = st.one_of(
    st.binary(max_size=64),
    # Valid messages with a few bytes flipped, cut or appended.
    st.builds(lambda good, cut, tail: good[:cut] + tail,
              messages(pb.UpdateUserRequest.DESCRIPTOR).map(lambda m: m.SerializeToString()),
              st.integers(0, 64), st.binary(max_size=8)),
)


@pytest.mark.parametrize("method", list(METHODS))
def test_raw_bytes_requests_get_deliberate_statuses(channel: grpc.Channel, method: str) -> None:
    """Random bytes as the request, whether or not they parse as the method's message."""
    kind = METHODS[method][1]

    @settings(FUZZ, max_examples=EXAMPLES["raw"])
    @given(payload=raw_payloads)
    def run(payload: bytes) -> None:
        label = f"raw {method}" + ("" if parses(kind, payload) else " (unparsable)")
        check(label, send_raw(channel, method, payload), payload)

    run()


@pytest.mark.parametrize(
    "method", [m for m in METHODS if m not in ("BulkCreateUsers", "ImportUsers")])
def test_unparsable_request_bytes_are_invalid_argument(
    channel: grpc.Channel, method: str
) -> None:
    assert send_raw(channel, method, b"\xff\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT


def test_unparsable_bulk_rows_are_refused_row_by_row(channel: grpc.Channel) -> None:
    call = channel.stream_unary(SERVICE + "BulkCreateUsers", request_serializer=None,
                                response_deserializer=pb.BulkCreateResponse.FromString)
    good = pb.CreateUserRequest(email="raw-row@example.com").SerializeToString()
    response = call(iter([b"\xff\xff\xff", good, b"\x0a\x05ab"]), timeout=CALL_TIMEOUT)
    assert response.created_count == 1
    assert [(e.index, e.code, e.field) for e in response.errors] == [
        (0, grpc.StatusCode.INVALID_ARGUMENT.value[0], "request"),
        (2, grpc.StatusCode.INVALID_ARGUMENT.value[0], "request"),
    ]


# -- afterwards -----------------------------------------------------------------------------


def test_hub_survived_the_fuzzing(fuzz_hub: HubProcess, channel: grpc.Channel) -> None:
    assert fuzz_hub.proc.poll() is None, fuzz_hub.output()[-3000:]
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                       timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = UserServiceStub(channel)
    user = stub.CreateUser(pb.CreateUserRequest(email="after-fuzz@example.com"), timeout=5)
    assert stub.GetUser(pb.GetUserRequest(user_id=user.id), timeout=5).id == user.id
    # Nothing the clients sent made the hub log a traceback ("unexpected error").
    unexpected = []
    for line in fuzz_hub.output().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            unexpected.append(line)  # not a log record: something printed to stderr
            continue
        if "exception" in entry or entry.get("level") in ("ERROR", "CRITICAL"):
            unexpected.append(f"{entry['message']}\n{entry.get('exception', '')}")
    assert not unexpected, "\n".join(unexpected[:5])
    total = sum(sum(c.values()) for rpc, c in VOLUME.items() if not rpc.startswith("Sync "))
    summary = "; ".join(f"{rpc}: {sum(c.values())} {dict(c)}" for rpc, c in sorted(VOLUME.items()))
    print(f"\nfuzzed {total} calls: {summary}")
    assert all(not (set(c) & {s.name for s in NOT_DELIBERATE}) for c in VOLUME.values())
