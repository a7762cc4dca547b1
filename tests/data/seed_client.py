"""A client built only from the seed's proto (generated at test time), run against a hub.

Usage: seed_client.py GENERATED_DIR TARGET; prints one JSON line of what it saw.
"""

import json
import sys

import grpc

sys.path.insert(0, sys.argv[1])  # the seed's generated modules live only in the test's tmp dir
import user_service_pb2 as pb2
import user_service_pb2_grpc as pb2_grpc

with grpc.insecure_channel(sys.argv[2]) as channel:
    stub = pb2_grpc.UserServiceStub(channel)
    created = stub.CreateUser(pb2.CreateUserRequest(email="seed@example.com", name="Seed",
                                                    password="correct horse"), timeout=5)
    got = stub.GetUser(pb2.GetUserRequest(user_id=created.id), timeout=5)
    bulk = stub.BulkCreateUsers(
        iter([pb2.CreateUserRequest(email=f"s{i}@example.com", name=f"S{i}") for i in range(3)]
             + [pb2.CreateUserRequest(email="not-an-email")]),
        timeout=5,
    )
    listed = [u.email for u in stub.ListUsers(pb2.ListUsersRequest(page_size=2), timeout=5)]
    try:
        stub.GetUser(pb2.GetUserRequest(user_id="01ARZ3NDEKTSV4RRFFQ69G5FAV"), timeout=5)
        missing = "OK"
    except grpc.RpcError as e:
        missing = e.code().name
    print(json.dumps({
        "created": [created.id, created.email, created.name, created.status,
                    created.created_at.seconds > 0],
        "got": [got.id, got.email],
        "bulk": [bulk.created_count, len(bulk.user_ids)],
        "listed": listed,
        "missing": missing,
    }))
