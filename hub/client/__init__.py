"""Typed clients for user.v1.UserService: `UserClient` (blocking) and `AsyncUserClient` (asyncio).

    from hub.client import UserClient, UserNotFoundError

    with UserClient("localhost:50051", timeout=5.0) as users:
        alice = users.create_user("alice@example.com", name="Alice")
        users.update_user(alice.id, name="Alice B.", expected_version=alice.version)
        try:
            users.get_user("01HZZZZZZZZZZZZZZZZZZZZZZZ")
        except UserNotFoundError as err:
            print(err.code, err.details)
        for user in users.list_users():
            print(user.id, user.email)

    async with AsyncUserClient() as users:
        user = await users.get_user(alice.id)
        async for user in users.list_users(page_size=500):
            ...

Errors. Every failed call raises a `ClientError` subclass chained (`from`) to the grpc error:

    ClientError                  .code (grpc.StatusCode), .details, .violations [(field, why)]
     ├── InvalidArgumentError    INVALID_ARGUMENT; .violations lists the offending fields
     ├── UserNotFoundError       NOT_FOUND
     ├── AlreadyExistsError      ALREADY_EXISTS (the email is taken)
     ├── VersionConflictError    ABORTED: expected_version did not match, or the user was
     │                           changing too fast; nothing was written, re-read and retry
     └── UnavailableError        UNAVAILABLE: the server or its store cannot be reached

Other codes (DEADLINE_EXCEEDED, INTERNAL, ...) raise a plain `ClientError`.

Deadlines. Every call carries one: `timeout` (default 5 s) for unary calls and `stream_timeout`
(default 300 s, the whole stream) for ListUsers and BulkCreateUsers; both can be overridden
per call. A deadline covers all retry attempts of the call, not each one.

Concurrency. One client is one channel, one HTTP/2 connection, and the hub serves at most 100
calls at once on a connection (`--max-concurrent-streams`). A client runs at most
`max_in_flight` (default 64) unary calls at once; more wait their turn in the client, the
wait counted in their deadline. (gRPC's own queue is not enough: the hub's transport counts a
finished call against the limit until the server has released it, and refuses calls beyond it
with REFUSED_STREAM, which gRPC reports as UNAVAILABLE.) A call refused that way was never
seen by the hub, so the client sends it again, writes included, within its deadline.

Retries. gRPC's own retry machinery does them, configured by a service config on the channel
(`RETRY_SERVICE_CONFIG`), which brings exponential backoff with jitter and honours the deadline:

* GetUser and ListUsers are retried on UNAVAILABLE, up to 5 attempts in all, backoff starting
  at 0.1 s, doubling, capped at 2 s. ListUsers is retried only until its first user arrives
  (gRPC then commits to the attempt); after that, resume with `page_token=<last id seen>`.
* CreateUser, BulkCreateUsers, UpdateUser and DeleteUser are never retried by the client. When
  a write fails with UNAVAILABLE the server may have applied it anyway, and a blind retry could
  create a second user or apply an update twice. Deciding is left to the caller, who knows
  whether the write is safe to repeat (e.g. an update guarded by `expected_version`).
"""

# The package, one owner per concern: errors.py (the exception tree and `_mapped()`, the one
# place a grpc error becomes a ClientError), channel.py (options, credentials, the call cap
# and the resending of refused calls), clients.py (the two clients), feed.py (SyncFeed).

from hub.client.channel import CHANNEL_OPTIONS, RETRY_SERVICE_CONFIG, Credentials
from hub.client.clients import AsyncUserClient, UserClient
from hub.client.errors import (
    AlreadyExistsError,
    ClientError,
    InvalidArgumentError,
    UnavailableError,
    UserNotFoundError,
    VersionConflictError,
    from_rpc_error,
)
from hub.client.feed import ContinuityLost, SyncBatch, SyncFeed

__all__ = [
    "CHANNEL_OPTIONS",
    "RETRY_SERVICE_CONFIG",
    "AlreadyExistsError",
    "AsyncUserClient",
    "ClientError",
    "ContinuityLost",
    "Credentials",
    "InvalidArgumentError",
    "SyncBatch",
    "SyncFeed",
    "UnavailableError",
    "UserClient",
    "UserNotFoundError",
    "VersionConflictError",
    "from_rpc_error",
]
