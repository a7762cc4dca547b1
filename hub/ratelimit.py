"""Per-principal token buckets: bound how fast any one caller can write."""

from __future__ import annotations

import time
from collections import OrderedDict

from hub.errors import RateLimited


class RateLimiter:
    """`rate` writes per second per principal, bursts of up to `burst`.

    Buckets of principals idle long enough to be full again are forgotten, so memory stays
    bounded by the number of recently active principals (at most `max_principals`).
    """

    def __init__(self, rate: float, burst: int, max_principals: int = 100_000) -> None:
        self._rate, self._burst, self._max = rate, float(burst), max_principals
        self.burst = burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, principal: str, cost: float = 1.0) -> None:
        """Spends `cost` tokens or raises RateLimited with the wait until they are there."""
        if self._rate <= 0:
            return
        now = time.monotonic()
        tokens, last = self._buckets.pop(principal, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < cost:
            self._buckets[principal] = (tokens, now)
            raise RateLimited((cost - tokens) / self._rate)
        self._buckets[principal] = (tokens - cost, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
