"""Redis refusals as hub's errors (hub.store.redis._unavailable), for the exceptions redis-py
raises whose message does not start with the reply's code word (seen as INTERNAL in the chaos
run on a cluster: a master failing over, a slot half-moved, a connection its peer closed)."""

from __future__ import annotations

import pytest
from redis import exceptions as redis_errors

from hub.errors import StoreUnavailable
from hub.store.redis import _unavailable


@pytest.mark.parametrize(("exc", "says"), [
    (redis_errors.ClusterDownError("The cluster is down"), "reports its cluster down"),
    (redis_errors.MasterDownError("Link with MASTER is down"), "reports its cluster down"),
    (redis_errors.TryAgainError("Multiple keys request during rehashing of slot"),
     "asked to try again"),
    (redis_errors.ResponseError("Command # 1 (EVALSHA ...) of pipeline caused error: "
                                "TRYAGAIN Multiple keys"), "asked to try again"),
    (RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is"
                  " closed"), "closed the connection"),
    (AttributeError("'NoneType' object has no attribute 'writelines'"),
     "closed the connection"),
])
def test_refusals_whose_message_lost_the_code_word_are_unavailable(
    exc: Exception, says: str,
) -> None:
    with pytest.raises(StoreUnavailable, match=says) as caught, \
            _unavailable(write=True, where="Redis at x:1"):
        raise exc
    assert "Redis at x:1" in str(caught.value)


def test_other_runtime_and_attribute_errors_stay_bugs() -> None:
    for exc in (RuntimeError("something else"), AttributeError("'User' has no 'x'"),
                redis_errors.ResponseError("ERR unknown command")):
        with pytest.raises(type(exc)), _unavailable(where="Redis at x:1"):
            raise exc


@pytest.mark.anyio
async def test_a_replaced_history_found_while_another_write_forgot_the_heads(
    redis_url: str,
) -> None:
    # Seen in the 10-minute Sentinel chaos run as INTERNAL (a KeyError): a write learns the
    # history went back while another write of the same process has just started a new epoch
    # and forgotten what it knew of the partitions.
    from hub.domain import NewUser, UserStatus, partition_of
    from hub.store.redis import RedisStore

    store = RedisStore.from_url(redis_url, partitions=4)
    try:
        first = await store.create(NewUser.build("a@x.io", "A", UserStatus.ACTIVE))
        p = first.partition
        real = store._run_write
        calls = 0

        async def racing(*args: object) -> object:
            nonlocal calls
            calls += 1
            if calls == 1:
                store._heads.clear()  # the other write's new epoch, meanwhile
                return [store._seen_epoch.encode(), 2, p, 0]
            return await real(*args)  # type: ignore[arg-type]

        store._run_write = racing  # type: ignore[method-assign]
        while True:  # a user in the same partition, so this write sends what it knew of it
            new = NewUser.build(f"b{calls}@x.io", "B", UserStatus.ACTIVE)
            if partition_of(new.user.id, 4) == p:
                break
        second = await store.create(new)
        assert calls == 2 and second.user.id == new.user.id
    finally:
        await store.aclose()
