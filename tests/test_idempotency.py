"""Idempotency keys and write positions at the gRPC edge, on every store (embedded, one Redis,
Redis Cluster): the `idempotency-key` request metadata, ImportUsers' per-row keys, the stream
key of a bulk stream, and the trailing `hub-position` of every write."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hub import resume
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub
from hub.rpc.server import HubServer

KEY = resume.IDEMPOTENCY_KEY


async def _trailing(call: Any, key: str) -> str:
    return str(dict(await call.trailing_metadata() or ())[key])


async def _count_users(stub: UserServiceStub) -> int:
    return len([u async for u in stub.ListUsers(pb.ListUsersRequest(page_size=1000))])


def _bad_field(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return str(bad.field_violations[0].field)
    raise AssertionError("no BadRequest detail")


async def test_a_create_sent_twice_with_one_key_creates_once(
        stub: UserServiceStub, hub: HubServer) -> None:
    request = pb.CreateUserRequest(email="ada@example.com", name="Ada", password="pw-123456")
    call = stub.CreateUser(request, metadata=((KEY, "create-1"),))
    first = await call
    position = resume.decode(await _trailing(call, resume.POSITION_KEY), hub.store.partitions,
                             "hub-position")
    again_call = stub.CreateUser(request, metadata=((KEY, "create-1"),))
    again = await again_call
    assert again == first  # same id, version, timestamps
    assert (await _trailing(again_call, resume.POSITION_KEY)
            == await _trailing(call, resume.POSITION_KEY))
    assert sum(position.offsets) == 1  # the one write's offset, nothing else
    assert await _count_users(stub) == 1


async def test_a_key_reused_for_another_request_is_invalid_argument(
        stub: UserServiceStub) -> None:
    await stub.CreateUser(pb.CreateUserRequest(email="ada@example.com"),
                          metadata=((KEY, "k"),))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateUser(pb.CreateUserRequest(email="bob@example.com"),
                              metadata=((KEY, "k"),))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_field(refused.value) == "idempotency-key"
    assert await _count_users(stub) == 1


async def test_a_malformed_key_is_refused_and_writes_nothing(stub: UserServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateUser(pb.CreateUserRequest(email="ada@example.com"),
                              metadata=((KEY, "k" * 300),))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_field(refused.value) == "idempotency-key"
    assert await _count_users(stub) == 0


async def test_update_and_delete_retried_apply_once(stub: UserServiceStub) -> None:
    user = await stub.CreateUser(pb.CreateUserRequest(email="ada@example.com"))
    update = pb.UpdateUserRequest(user=common_pb2.User(id=user.id, name="Ada L."),
                                  expected_version=1)
    first = await stub.UpdateUser(update, metadata=((KEY, "u"),))
    # Retried: the first outcome, though expected_version 1 is stale by now.
    assert await stub.UpdateUser(update, metadata=((KEY, "u"),)) == first
    delete = pb.DeleteUserRequest(user_id=user.id)
    await stub.DeleteUser(delete, metadata=((KEY, "d"),))
    call = stub.DeleteUser(delete, metadata=((KEY, "d"),))
    await call  # not NOT_FOUND: the first delete's outcome
    assert await _trailing(call, resume.POSITION_KEY)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.DeleteUser(delete)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_import_sent_again_creates_every_row_once(stub: UserServiceStub) -> None:
    rows = [pb.CreateUserRequest(email=f"u{i}@example.com") for i in range(30)]
    keys = [f"file-1/{i}" for i in range(30)]

    async def send(upto: int) -> pb.BulkCreateResponse:
        messages = [pb.ImportUsersRequest(users=rows[a:min(a + 10, upto)],
                                          idempotency_keys=keys[a:min(a + 10, upto)])
                    for a in range(0, upto, 10)]
        call = stub.ImportUsers(iter(messages))
        response: pb.BulkCreateResponse = await call
        assert await _trailing(call, resume.POSITION_KEY)
        return response

    part = await send(17)  # the run that "crashed" after 17 rows
    whole = await send(30)  # the re-run, whole
    assert whole.created_count == 30 and not whole.errors
    assert list(whole.user_ids[:17]) == list(part.user_ids)
    assert await _count_users(stub) == 30


async def test_a_bulk_stream_key_keys_every_row(stub: UserServiceStub) -> None:
    rows = [pb.CreateUserRequest(email=f"b{i}@example.com") for i in range(5)]
    first = await stub.BulkCreateUsers(iter(rows), metadata=((KEY, "bulk-1"),))
    again = await stub.BulkCreateUsers(iter(rows), metadata=((KEY, "bulk-1"),))
    assert list(again.user_ids) == list(first.user_ids) and not again.errors
    # Another row at index 0 under the same stream key is another request for key bulk-1/0.
    other = await stub.BulkCreateUsers(iter([pb.CreateUserRequest(email="x@example.com")]),
                                       metadata=((KEY, "bulk-1"),))
    assert other.errors[0].field == "idempotency-key"
    assert await _count_users(stub) == 5


async def test_more_keys_than_rows_is_refused(stub: UserServiceStub) -> None:
    message = pb.ImportUsersRequest(users=[pb.CreateUserRequest(email="a@example.com")],
                                    idempotency_keys=["a", "b"])
    response = await stub.ImportUsers(iter([message]))
    assert response.created_count == 0
    assert response.errors[0].field == "idempotency_keys"
