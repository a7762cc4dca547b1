"""Request-field rules shared by every write path (unary, bulk and streamed changes)."""

from __future__ import annotations

import re

from hub.domain import UserStatus
from hub.errors import FieldViolation, InvalidArgument, LimitExceeded

MAX_EMAIL = 254  # RFC 5321 path limit
MAX_EMAIL_LOCAL = 64
MAX_NAME = 200
MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # argon2 cost grows with input; bound what one request can spend

# Pragmatic, not RFC 5322: one @, a dot-atom local part, and a dotted domain of DNS labels.
_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)


# A canonical ULID: upper-case Crockford base32, and at most 7 first so it fits 128 bits.
_USER_ID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def email_violation(email: str, field: str = "email") -> FieldViolation | None:
    if not email:
        return FieldViolation(field, "required")
    if len(email) > MAX_EMAIL:
        return FieldViolation(field, f"longer than {MAX_EMAIL} characters")
    if not _EMAIL.fullmatch(email) or len(email.partition("@")[0]) > MAX_EMAIL_LOCAL:
        return FieldViolation(field, "not a valid email address")
    return None


def name_violation(name: str, field: str = "name") -> FieldViolation | None:
    if len(name) > MAX_NAME:
        return FieldViolation(field, f"longer than {MAX_NAME} characters")
    if _CONTROL.search(name):
        return FieldViolation(field, "contains control characters")
    return None


def password_violation(password: str, field: str = "password") -> FieldViolation | None:
    if password and not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        return FieldViolation(field, f"must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return None


def status_violation(
    status: int, field: str = "status", allow_unspecified: bool = True
) -> FieldViolation | None:
    if status not in UserStatus._value2member_map_:
        return FieldViolation(field, f"unknown status {status}")
    if not allow_unspecified and status == UserStatus.UNSPECIFIED:
        return FieldViolation(field, "must be USER_STATUS_ACTIVE or USER_STATUS_INACTIVE")
    return None


def check(*violations: FieldViolation | None) -> None:
    """Raise one InvalidArgument listing every violation, so a caller fixes all at once."""
    found = [v for v in violations if v is not None]
    if found:
        raise InvalidArgument(*found)


# The fields an update may name in its mask.
MASKABLE = ("email", "name", "status")


def mask_violations(paths: tuple[str, ...]) -> list[FieldViolation]:
    unknown = [p for p in paths if p not in MASKABLE]
    found = []
    if unknown:
        found.append(FieldViolation(
            "update_mask.paths", f"unknown path(s) {unknown}; allowed: {list(MASKABLE)}"))
    if not paths:
        found.append(FieldViolation("update_mask", "names no field to update"))
    return found


def version_violation(expected: int | None) -> FieldViolation | None:
    if expected is not None and expected < 1:
        return FieldViolation("expected_version", "must be at least 1")
    return None


def page_size_violation(page_size: int, most: int) -> FieldViolation | None:
    if not 0 <= page_size <= most:
        return FieldViolation("page_size", f"must be 0 (the default, 100) to {most}")
    return None


def user_id_violation(user_id: str, field: str = "user_id") -> FieldViolation | None:
    if not user_id:
        return FieldViolation(field, "required")
    if not _USER_ID.fullmatch(user_id):
        return FieldViolation(field, "not a user id (26-character upper-case ULID)")
    return None


# -- Subscribe (Sync and UserUpdates) -----------------------------------------------------------


def subscribes_over(nth: int, most: int) -> LimitExceeded | None:
    """The `nth` Subscribe of a stream, against --max-subscribes-per-stream."""
    if nth > most:
        return LimitExceeded("subscribe", f"at most {most} per stream")
    return None


def subscribe_size_violation(ids: int, most: int) -> FieldViolation | None:
    """Ids named in one Subscribe, against --max-subscription-users (decided on the count
    alone, before any id is looked at)."""
    if ids > most:
        return FieldViolation("subscribe.user_ids", f"at most {most} users")
    return None


def first_subscribe_violations(
    nth: int, resume_token: bool, conflate: bool, catch_up: bool = False,
    min_position: bool = False,
) -> list[FieldViolation]:
    """A resume token, conflation, a catch-up mode and a min_position set up a stream: only
    its first Subscribe may ask."""
    if nth <= 1:
        return []
    return [FieldViolation(f"subscribe.{name}", "only on a stream's first Subscribe")
            for name, asked in (("resume_token", resume_token), ("conflate", conflate),
                                ("catch_up", catch_up), ("min_position", min_position))
            if asked]


# Subscribe.catch_up's values (user.v1.CatchUp): unspecified, state.
CATCH_UP_MODES = (0, 1)


def catch_up_violation(mode: int) -> FieldViolation | None:
    if mode not in CATCH_UP_MODES:
        return FieldViolation("subscribe.catch_up", f"unknown catch-up mode {mode}")
    return None


def stream_users_over(followed: int, most: int) -> LimitExceeded | None:
    """Distinct ids a stream would follow, against --max-stream-users."""
    if followed > most:
        return LimitExceeded(
            "subscribe.user_ids", f"a stream may follow at most {most} users in all; this"
            f" Subscribe would make it {followed} (unsubscribe some, or open another stream)")
    return None
