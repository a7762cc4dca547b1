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
