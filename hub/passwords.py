"""argon2id password hashing, run in worker threads so the event loop never blocks on it."""

from __future__ import annotations

import anyio
import anyio.to_thread
from argon2 import PasswordHasher


class PasswordHashing:
    """Hashes with argon2id (argon2-cffi's defaults, RFC 9106 low-memory profile).

    `limit` caps concurrent hashes: each costs ~64 MiB and tens of milliseconds of a core.
    """

    def __init__(self, limit: int = 2, hasher: PasswordHasher | None = None) -> None:
        self._hasher = hasher or PasswordHasher()
        self._limiter = anyio.CapacityLimiter(limit)

    async def hash(self, password: str) -> str:
        return await anyio.to_thread.run_sync(self._hasher.hash, password, limiter=self._limiter)
