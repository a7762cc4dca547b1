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

Retries. Reads are retried by gRPC's own retry machinery, configured by a service config on
the channel (`RETRY_SERVICE_CONFIG`), which brings exponential backoff with jitter and honours
the deadline; writes with an idempotency key by the client itself (below):

* GetUser and ListUsers are retried on UNAVAILABLE, up to 5 attempts in all, backoff starting
  at 0.1 s, doubling, capped at 2 s. ListUsers is retried only until its first user arrives
  (gRPC then commits to the attempt); after that, resume with `page_token=<last id seen>`.
* A write (CreateUser, UpdateUser, DeleteUser, BulkCreateUsers, ImportUsers) without an
  idempotency key is never retried by the client. When a write fails with UNAVAILABLE or
  DEADLINE_EXCEEDED the server may have applied it anyway, and a blind retry could create a
  second user or apply an update twice.
* A write with one is: see below.

Idempotency keys. Every write method takes `idempotency_key=` (keyword; None or "": none),
sent as the request metadata `idempotency-key`. The hub remembers a key, per principal, for
its idempotency window (`--idempotency-window`, 24 h by default): a repeat of the same request
with the same key returns the first outcome (the same user, version and position) and writes
nothing; the same key with another request is INVALID_ARGUMENT (field `idempotency-key`).
After the window a key is forgotten and its reuse writes again. A key names one write: use a
fresh one (`uuid.uuid4().hex`) per intended change, and the same one for its retries.

    ada = users.create_user("ada@example.com", idempotency_key=key)   # retried by itself

A write with a key is retried by the client on UNAVAILABLE and DEADLINE_EXCEEDED (the codes
that leave its outcome unknown), within the call's one deadline (`timeout`):

* at most `write_attempts` attempts in all (default 5, a client option; 1: never retried);
* after a pause of 0.1 s doubling to 2 s, each jittered to 50-100% of its step;
* while another attempt is allowed, an attempt's own deadline is at most half the call's, so
  an attempt lost to a hung hub or store leaves time for one more; the last attempt gets all
  that is left. A pause that would not fit in the deadline is not taken: the last error is
  raised.

A bulk stream (`bulk_create`, `import_users`) with a key is the stream's: row N gets "K/N"
(`import_users` rows may carry their own keys instead: `(request, key)` pairs). It is sent
again by itself only when its rows can be iterated again (a list, a tuple: an iterable that is
not an iterator), on UNAVAILABLE in practice: each attempt has all of the stream's deadline
that is left, so one that exceeds it leaves no time for another. Rows the first attempt
created are reported created again. A generator's rows are sent once; to go again, send the
same rows with the same key.

Positions (read-your-writes). Every write method has a `*_with_position` twin returning a
`Written(result, position)`: `position` is the hub's trailing `hub-position`, a token covering
the write. `SyncFeed(..., min_position=written.position)` on any instance then holds its
first response until that instance has routed the write, so the write is in what it shows.
The plain methods keep their return types (User, None, BulkCreateResponse).
"""

# The package, one owner per concern: errors.py (the exception tree and `_mapped()`, the one
# place a grpc error becomes a ClientError), channel.py (options, credentials, the call cap
# and the resending of refused calls), clients.py (the two clients), feed.py (SyncFeed).

from hub.client.channel import (
    CHANNEL_OPTIONS,
    DEFAULT_WRITE_ATTEMPTS,
    RETRY_SERVICE_CONFIG,
    Credentials,
)
from hub.client.clients import AsyncUserClient, ImportRow, UserClient, Written
from hub.client.errors import (
    AlreadyExistsError,
    ClientError,
    InvalidArgumentError,
    UnavailableError,
    UserNotFoundError,
    VersionConflictError,
    from_rpc_error,
)
from hub.client.feed import ContinuityLost, Resynced, SyncBatch, SyncFeed
from hub.resume import IDEMPOTENCY_KEY, POSITION_KEY

__all__ = [
    "CHANNEL_OPTIONS",
    "DEFAULT_WRITE_ATTEMPTS",
    "IDEMPOTENCY_KEY",
    "POSITION_KEY",
    "RETRY_SERVICE_CONFIG",
    "AlreadyExistsError",
    "AsyncUserClient",
    "ClientError",
    "ContinuityLost",
    "Credentials",
    "ImportRow",
    "InvalidArgumentError",
    "Resynced",
    "SyncBatch",
    "SyncFeed",
    "UnavailableError",
    "UserClient",
    "UserNotFoundError",
    "VersionConflictError",
    "Written",
    "from_rpc_error",
]
