"""Two `hub serve` processes sharing one Redis behave as one service."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import field_mask_pb2

from harness.hub import HubProcess
from hub.api.user.v1 import common_pb2
from hub.api.user.v1 import user_service_pb2 as pb
from hub.api.user.v1.user_service_pb2_grpc import UserServiceStub


@pytest.fixture
def two_hubs(
    hub_process: Callable[..., HubProcess], redis_url: str
) -> Iterator[tuple[UserServiceStub, UserServiceStub]]:
    a, b = hub_process(redis_url), hub_process(redis_url)
    assert a.port != b.port
    with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
        yield UserServiceStub(ca), UserServiceStub(cb)


def test_created_on_one_is_read_listed_changed_on_the_other(
    two_hubs: tuple[UserServiceStub, UserServiceStub],
) -> None:
    a, b = two_hubs
    created = [a.CreateUser(pb.CreateUserRequest(email=f"x{i}@example.com", name=f"X{i}"),
                            timeout=5) for i in range(5)]
    assert b.GetUser(pb.GetUserRequest(user_id=created[0].id), timeout=5) == created[0]
    listed = list(b.ListUsers(pb.ListUsersRequest(page_size=2), timeout=5))
    assert listed == created

    updated = b.UpdateUser(pb.UpdateUserRequest(
        user=common_pb2.User(id=created[1].id, name="Changed on B"),
        update_mask=field_mask_pb2.FieldMask(paths=["name"])), timeout=5)
    assert a.GetUser(pb.GetUserRequest(user_id=created[1].id), timeout=5) == updated

    a.DeleteUser(pb.DeleteUserRequest(user_id=created[2].id), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        b.GetUser(pb.GetUserRequest(user_id=created[2].id), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_email_stays_unique_under_concurrent_creates_on_both(
    two_hubs: tuple[UserServiceStub, UserServiceStub],
) -> None:
    a, b = two_hubs

    def attempt(i: int) -> str:
        stub = a if i % 2 else b
        try:
            stub.CreateUser(pb.CreateUserRequest(email=f"Race{i % 5}@example.com"), timeout=5)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name  # type: ignore[attr-defined,no-any-return]

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(40)))
    assert outcomes.count("OK") == 5
    assert outcomes.count("ALREADY_EXISTS") == 35
    assert len(list(a.ListUsers(pb.ListUsersRequest(), timeout=5))) == 5
