"""STS as the account sees it: one token bucket for every caller, `Throttling` beyond it.

STS's quota is per account and region and shared by everything in it; AWS publishes no
number (about 600 calls/s is what users report) and no burst. The model admits an
`AssumeRoleWithWebIdentity` when the bucket holds a whole token, decided when the call
arrives; every answer, admitted or throttled, comes `latency` later. A throttled call
costs no token (it does not count against the quota).

It also keeps the books every mode is judged by: admitted and throttled calls per
second of simulated time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class CallCounts:
    """Calls per whole second of simulated time: `admitted[s]`, `throttled[s]`."""

    admitted: list[int]
    throttled: list[int]

    def window(self, start: float, end: float) -> CallCounts:
        first, last = int(start), max(int(start), math.ceil(end))
        return CallCounts(admitted=self.admitted[first:last], throttled=self.throttled[first:last])

    @property
    def total_admitted(self) -> int:
        return sum(self.admitted)

    @property
    def total_throttled(self) -> int:
        return sum(self.throttled)

    def peak_per_second(self) -> int:
        """The most calls STS received in one second, throttled ones included."""
        return max((a + t for a, t in zip(self.admitted, self.throttled)), default=0)


class AccountSts:
    """The account's STS quota: `rate` calls/s, at most `burst` at once."""

    def __init__(self, *, rate_per_second: float, burst: int, latency_seconds: float) -> None:
        self.rate = rate_per_second
        self.burst = float(burst)
        self.latency = latency_seconds
        self._tokens = float(burst)
        self._at = 0.0
        self._admitted: list[int] = []
        self._throttled: list[int] = []

    def call(self, now: float) -> bool:
        """A call arrives at `now`: True if admitted, False if STS answers Throttling."""
        tokens = self._tokens + (now - self._at) * self.rate
        self._tokens = tokens if tokens < self.burst else self.burst
        self._at = now
        second = int(now)
        admitted, throttled = self._admitted, self._throttled
        if second >= len(admitted):
            grow = second + 1 - len(admitted)
            admitted.extend([0] * grow)
            throttled.extend([0] * grow)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            admitted[second] += 1
            return True
        throttled[second] += 1
        return False

    def counts(self) -> CallCounts:
        return CallCounts(admitted=list(self._admitted), throttled=list(self._throttled))
