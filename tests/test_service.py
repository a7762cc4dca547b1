"""Every UserService RPC, success and error paths, on both stores, through a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.rpc.server import HubServer

pytestmark = pytest.mark.anyio
Code = grpc.StatusCode
UNKNOWN_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


async def create(
    stub: UserServiceStub, email: str, name: str = "N", **kw: object
) -> common_pb2.User:
    request = pb.CreateUserRequest(email=email, name=name, **kw)  # type: ignore[arg-type]
    return await stub.CreateUser(request, timeout=5)


async def fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "expected google.rpc.Status details"
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


async def all_users(stub: UserServiceStub, **kw: object) -> list[common_pb2.User]:
    return [u async for u in stub.ListUsers(pb.ListUsersRequest(**kw), timeout=5)]  # type: ignore[arg-type]


# -- CreateUser / GetUser -----------------------------------------------------------------


async def test_create_then_get(stub: UserServiceStub) -> None:
    user = await create(stub, "ada@example.com", "Ada Lovelace", password="analytical")
    assert len(user.id) == 26 and user.version == 1
    assert user.status == common_pb2.USER_STATUS_ACTIVE
    assert user.created_at.seconds > 0 and user.updated_at == user.created_at
    got = await stub.GetUser(pb.GetUserRequest(user_id=user.id), timeout=5)
    assert got == user


async def test_create_with_status(stub: UserServiceStub) -> None:
    user = await create(stub, "i@example.com", status=common_pb2.USER_STATUS_INACTIVE)
    assert user.status == common_pb2.USER_STATUS_INACTIVE


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"email": ""}, "email"),
        ({"email": "no-at-sign"}, "email"),
        ({"email": "a@b"}, "email"),
        ({"email": "x" * 250 + "@example.com"}, "email"),
        ({"email": "ok@example.com", "name": "n" * 201}, "name"),
        ({"email": "ok@example.com", "name": "bad\x00name"}, "name"),
        ({"email": "ok@example.com", "password": "short"}, "password"),
        ({"email": "ok@example.com", "status": 7}, "status"),
    ],
)
async def test_create_refuses_bad_input(
    stub: UserServiceStub, request_fields: dict[str, object], field: str
) -> None:
    err = await fails(stub.CreateUser(pb.CreateUserRequest(**request_fields), timeout=5))  # type: ignore[arg-type]
    assert err.code() == Code.INVALID_ARGUMENT
    assert field in violations(err)
    assert await all_users(stub) == []  # nothing was written


async def test_create_reports_every_bad_field_at_once(stub: UserServiceStub) -> None:
    err = await fails(stub.CreateUser(pb.CreateUserRequest(email="bad", name="\x07"), timeout=5))
    assert set(violations(err)) == {"email", "name"}


async def test_email_is_unique_case_insensitively(stub: UserServiceStub) -> None:
    await create(stub, "Grace@Example.com")
    err = await fails(create(stub, "grace@example.COM"))
    assert err.code() == Code.ALREADY_EXISTS
    assert [u.email for u in await all_users(stub)] == ["Grace@Example.com"]


async def test_get_unknown_and_malformed_ids(stub: UserServiceStub) -> None:
    err = await fails(stub.GetUser(pb.GetUserRequest(user_id=UNKNOWN_ID), timeout=5))
    assert err.code() == Code.NOT_FOUND
    for bad in ("", "nope", UNKNOWN_ID.lower()):
        err = await fails(stub.GetUser(pb.GetUserRequest(user_id=bad), timeout=5))
        assert err.code() == Code.INVALID_ARGUMENT
        assert "user_id" in violations(err)


# -- UpdateUser -----------------------------------------------------------------------------


def update_request(user_id: str, paths: list[str] | None = None, expected: int | None = None,
                   **fields: object) -> pb.UpdateUserRequest:
    req = pb.UpdateUserRequest(user=common_pb2.User(id=user_id, **fields))  # type: ignore[arg-type]
    if paths is not None:
        req.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
    if expected is not None:
        req.expected_version = expected
    return req


async def test_update_applies_only_masked_fields(stub: UserServiceStub) -> None:
    user = await create(stub, "u@example.com", "Old")
    updated = await stub.UpdateUser(
        update_request(user.id, ["name"], name="New", email="ignored@example.com"), timeout=5
    )
    assert (updated.name, updated.email, updated.version) == ("New", "u@example.com", 2)
    assert updated.created_at == user.created_at
    assert updated.updated_at.ToMicroseconds() >= user.updated_at.ToMicroseconds()
    status = await stub.UpdateUser(
        update_request(user.id, ["status"], status=common_pb2.USER_STATUS_INACTIVE), timeout=5
    )
    assert status.status == common_pb2.USER_STATUS_INACTIVE and status.version == 3


async def test_update_without_mask_takes_set_fields(stub: UserServiceStub) -> None:
    user = await create(stub, "m@example.com", "Old")
    updated = await stub.UpdateUser(update_request(user.id, email="n@example.com"), timeout=5)
    assert (updated.email, updated.name) == ("n@example.com", "Old")
    # The old email is free again; the new one is taken.
    await create(stub, "m@example.com")
    err = await fails(create(stub, "N@example.com"))
    assert err.code() == Code.ALREADY_EXISTS


async def test_update_star_mask_replaces_all(stub: UserServiceStub) -> None:
    user = await create(stub, "s@example.com", "Old")
    updated = await stub.UpdateUser(
        update_request(user.id, ["*"], email="t@example.com", name="",
                       status=common_pb2.USER_STATUS_INACTIVE), timeout=5)
    assert (updated.email, updated.name, updated.status) == ("t@example.com", "", 2)


async def test_update_expected_version(stub: UserServiceStub) -> None:
    user = await create(stub, "v@example.com", "A")
    ok = await stub.UpdateUser(update_request(user.id, ["name"], 1, name="B"), timeout=5)
    assert ok.version == 2
    err = await fails(stub.UpdateUser(update_request(user.id, ["name"], 1, name="C"), timeout=5))
    assert err.code() == Code.ABORTED
    got = await stub.GetUser(pb.GetUserRequest(user_id=user.id), timeout=5)
    assert (got.name, got.version) == ("B", 2)


@pytest.mark.parametrize(
    ("paths", "fields", "field"),
    [
        (["password"], {}, "update_mask.paths"),
        (["created_at"], {}, "update_mask.paths"),
        ([], {}, "update_mask"),
        (["email"], {"email": "bad"}, "user.email"),
        (["name"], {"name": "x" * 300}, "user.name"),
        (["status"], {"status": 0}, "user.status"),
        (["status"], {"status": 9}, "user.status"),
    ],
)
async def test_update_refuses_bad_input(
    stub: UserServiceStub, paths: list[str], fields: dict[str, object], field: str
) -> None:
    user = await create(stub, "b@example.com", "Keep")
    err = await fails(stub.UpdateUser(update_request(user.id, paths, **fields), timeout=5))
    assert err.code() == Code.INVALID_ARGUMENT
    assert field in violations(err)
    assert await stub.GetUser(pb.GetUserRequest(user_id=user.id), timeout=5) == user


async def test_update_errors(stub: UserServiceStub) -> None:
    a = await create(stub, "a@example.com")
    await create(stub, "b@example.com")
    err = await fails(stub.UpdateUser(update_request(a.id, ["email"], email="B@example.com"),
                                      timeout=5))
    assert err.code() == Code.ALREADY_EXISTS
    err = await fails(stub.UpdateUser(update_request(UNKNOWN_ID, ["name"], name="x"), timeout=5))
    assert err.code() == Code.NOT_FOUND
    err = await fails(stub.UpdateUser(update_request("", ["name"], name="x"), timeout=5))
    assert err.code() == Code.INVALID_ARGUMENT and "user.id" in violations(err)
    err = await fails(stub.UpdateUser(update_request(a.id, ["name"], 0, name="x"), timeout=5))
    assert err.code() == Code.INVALID_ARGUMENT and "expected_version" in violations(err)


# -- DeleteUser -----------------------------------------------------------------------------


async def test_delete(stub: UserServiceStub) -> None:
    user = await create(stub, "d@example.com")
    err = await fails(stub.DeleteUser(pb.DeleteUserRequest(user_id=user.id, expected_version=5),
                                      timeout=5))
    assert err.code() == Code.ABORTED
    await stub.DeleteUser(pb.DeleteUserRequest(user_id=user.id, expected_version=1), timeout=5)
    err = await fails(stub.GetUser(pb.GetUserRequest(user_id=user.id), timeout=5))
    assert err.code() == Code.NOT_FOUND
    err = await fails(stub.DeleteUser(pb.DeleteUserRequest(user_id=user.id), timeout=5))
    assert err.code() == Code.NOT_FOUND
    err = await fails(stub.DeleteUser(pb.DeleteUserRequest(user_id="x"), timeout=5))
    assert err.code() == Code.INVALID_ARGUMENT
    assert await all_users(stub) == []
    await create(stub, "d@example.com")  # the email is free again


# -- ListUsers ------------------------------------------------------------------------------


async def test_list_streams_everyone_in_id_order_across_pages(stub: UserServiceStub) -> None:
    ids = [(await create(stub, f"l{i}@example.com")).id for i in range(23)]
    for size in (0, 1, 5, 23, 1000):
        assert [u.id for u in await all_users(stub, page_size=size)] == sorted(ids)
    assert sorted(ids) == ids  # ids are time-ordered


async def test_list_resumes_after_page_token(stub: UserServiceStub) -> None:
    ids = [(await create(stub, f"p{i}@example.com")).id for i in range(10)]
    rest = await all_users(stub, page_size=3, page_token=ids[3])
    assert [u.id for u in rest] == ids[4:]
    assert await all_users(stub, page_token=ids[-1]) == []


@pytest.mark.parametrize(("fields", "field"), [
    ({"page_size": -1}, "page_size"),
    ({"page_size": 1001}, "page_size"),
    ({"page_token": "garbage"}, "page_token"),
])
async def test_list_refuses_bad_input(
    stub: UserServiceStub, fields: dict[str, object], field: str
) -> None:
    err = await fails(all_users(stub, **fields))
    assert err.code() == Code.INVALID_ARGUMENT and field in violations(err)


async def test_list_stops_when_client_goes_away(stub: UserServiceStub, hub: HubServer) -> None:
    async def rows() -> AsyncIterator[pb.CreateUserRequest]:
        for i in range(300):
            yield pb.CreateUserRequest(email=f"c{i}@example.com")

    await stub.BulkCreateUsers(rows(), timeout=10)
    call = stub.ListUsers(pb.ListUsersRequest(page_size=10), timeout=5)
    first = await call.read()
    assert isinstance(first, common_pb2.User)
    call.cancel()
    assert call.cancelled()
    # The server keeps serving other calls after the cancelled stream.
    assert len(await all_users(stub)) == 300


# -- BulkCreateUsers ------------------------------------------------------------------------


async def test_bulk_reports_bad_rows_and_keeps_good_ones(stub: UserServiceStub) -> None:
    await create(stub, "taken@example.com")

    async def rows() -> AsyncIterator[pb.CreateUserRequest]:
        for i in range(120):  # more than one store batch (the fixture's batch size is 50)
            email = f"b{i}@example.com"
            if i == 7:
                email = "not-an-email"
            elif i == 60:
                email = "TAKEN@example.com"
            elif i == 99:
                email = "b98@example.com"  # duplicate within the stream
            yield pb.CreateUserRequest(email=email, name=f"B{i}")

    response = await stub.BulkCreateUsers(rows(), timeout=10)
    assert response.created_count == 117 == len(response.user_ids)
    errors = {e.index: e for e in response.errors}
    assert set(errors) == {7, 60, 99}
    assert errors[7].code == Code.INVALID_ARGUMENT.value[0] and errors[7].field == "email"
    assert errors[60].code == Code.ALREADY_EXISTS.value[0]
    assert errors[99].code == Code.ALREADY_EXISTS.value[0]
    listed = await all_users(stub)
    assert len(listed) == 118
    created = {u.id: u for u in listed}
    assert [created[i].name for i in response.user_ids][:8] == [
        f"B{i}" for i in (0, 1, 2, 3, 4, 5, 6, 8)
    ]


async def test_bulk_empty_stream(stub: UserServiceStub) -> None:
    response = await stub.BulkCreateUsers(iter([]), timeout=5)
    assert response.created_count == 0 and not response.errors


async def test_bulk_with_passwords_hashes_them(stub: UserServiceStub, hub: HubServer) -> None:
    rows = [pb.CreateUserRequest(email=f"p{i}@x.io", password="long enough") for i in range(3)]
    response = await stub.BulkCreateUsers(iter(rows), timeout=20)
    assert response.created_count == 3
    stored = hub.store.password_hash(response.user_ids[0])  # type: ignore[attr-defined]
    if not isinstance(stored, str | None):
        stored = await stored
    assert stored is not None and stored.startswith("$argon2id$")
    assert "long enough" not in stored


async def test_bulk_response_never_exceeds_the_message_limit() -> None:
    from hub.settings import Settings
    from hub.store.memory import MemoryStore

    settings = Settings(port=0, max_message_bytes=16_384, bulk_batch_size=50)
    async with HubServer(settings, store=MemoryStore()) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = UserServiceStub(channel)
        rows = (pb.CreateUserRequest(email=f"r{i}@example.com") for i in range(5000))
        response = await stub.BulkCreateUsers(rows, timeout=10)
        assert response.ByteSize() <= 16_384
        *refused, stop = response.errors
        assert not refused
        assert stop.code == Code.RESOURCE_EXHAUSTED.value[0]
        # Every row before the stop was created, none after it.
        assert response.created_count == stop.index > 100
        assert len(await all_users(stub)) == stop.index


# -- ImportUsers ----------------------------------------------------------------------------


async def test_import_reports_rows_like_bulk_with_indexes_across_messages(
    stub: UserServiceStub,
) -> None:
    await create(stub, "taken@example.com")

    def message(first: int, count: int) -> pb.ImportUsersRequest:
        rows = []
        for i in range(first, first + count):
            email = f"i{i}@example.com"
            if i == 7:
                email = "not-an-email"
            elif i == 130:
                email = "TAKEN@example.com"
            elif i == 199:
                email = "i198@example.com"  # duplicate within the stream, another message
            rows.append(pb.CreateUserRequest(email=email, name=f"I{i}"))
        return pb.ImportUsersRequest(users=rows)

    # 120 rows per message: more than one store batch (the fixture's batch size is 50).
    messages = [message(0, 120), pb.ImportUsersRequest(), message(120, 80)]
    response = await stub.ImportUsers(iter(messages), timeout=10)
    assert response.created_count == 197 == len(response.user_ids)
    errors = {e.index: e for e in response.errors}
    assert set(errors) == {7, 130, 199}
    assert errors[7].code == Code.INVALID_ARGUMENT.value[0] and errors[7].field == "email"
    assert errors[130].code == Code.ALREADY_EXISTS.value[0] == errors[199].code
    created = {u.id: u for u in await all_users(stub)}
    assert len(created) == 198
    assert [created[i].name for i in response.user_ids][6:8] == ["I6", "I8"]


async def test_import_stops_at_an_unparsable_message(
    stub: UserServiceStub, hub: HubServer
) -> None:
    good = pb.ImportUsersRequest(users=[pb.CreateUserRequest(email=f"u{i}@example.com")
                                        for i in range(3)]).SerializeToString()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hub.port}") as channel:
        call = channel.stream_unary(
            "/user.v1.UserService/ImportUsers", request_serializer=None,
            response_deserializer=pb.BulkCreateResponse.FromString)
        response = await call(iter([good, b"\xff\xff\xff", good]), timeout=10)
    assert response.created_count == 3
    [error] = response.errors
    assert (error.index, error.code, error.field) == (
        3, Code.INVALID_ARGUMENT.value[0], "users")
    assert len(await all_users(stub)) == 3


async def test_import_respects_the_row_limit() -> None:
    from hub.settings import Settings
    from hub.store.memory import MemoryStore

    settings = Settings(port=0, bulk_max_rows=250, bulk_batch_size=100)
    async with HubServer(settings, store=MemoryStore()) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = UserServiceStub(channel)
        messages = [pb.ImportUsersRequest(users=[
            pb.CreateUserRequest(email=f"m{m}r{r}@example.com") for r in range(100)])
            for m in range(4)]
        response = await stub.ImportUsers(iter(messages), timeout=10)
        assert response.created_count == 250
        [stop] = response.errors
        assert stop.index == 250 and stop.code == Code.RESOURCE_EXHAUSTED.value[0]
        assert len(await all_users(stub)) == 250
