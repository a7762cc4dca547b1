"""hub's own ULID maker and id check agree with the python-ulid reference implementation."""

from __future__ import annotations

import os
import time

from ulid import ULID

from hub.domain import new_user_id
from hub.validation import user_id_violation


def test_new_ids_are_canonical_ulids_of_now() -> None:
    before = time.time()
    ids = [new_user_id() for _ in range(5000)]
    after = time.time()
    assert len(set(ids)) == len(ids)
    assert sorted(ids) == ids  # monotonic, within a millisecond too
    for user_id in ids:
        parsed = ULID.from_str(user_id)
        assert str(parsed) == user_id
        assert before - 0.002 <= parsed.timestamp <= after + 0.002
        assert user_id_violation(user_id) is None


def test_ids_sort_by_creation_millisecond() -> None:
    first = new_user_id()
    time.sleep(0.002)
    assert new_user_id()[:10] > first[:10]


def test_id_check_accepts_exactly_the_canonical_ulids() -> None:
    for _ in range(2000):
        assert user_id_violation(str(ULID.from_bytes(os.urandom(16)))) is None
    for bad in ("", "01ARZ3NDEKTSV4RRFFQ69G5FA", "01ARZ3NDEKTSV4RRFFQ69G5FAVV",
                "01arz3ndektsv4rrffq69g5fav", "01ARZ3NDEKTSV4RRFFQ69G5FAI",
                "01ARZ3NDEKTSV4RRFFQ69G5FAL", "01ARZ3NDEKTSV4RRFFQ69G5FAO",
                "01ARZ3NDEKTSV4RRFFQ69G5FAU", "81ARZ3NDEKTSV4RRFFQ69G5FAV",
                "01ARZ3NDEKTSV4RRFFQ69G5FA\n"):
        assert user_id_violation(bad) is not None, bad
