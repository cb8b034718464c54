"""Direct IRSA: every pod's SDK calls STS itself, at start and at every refresh.

botocore's web-identity provider makes one `AssumeRoleWithWebIdentity` per fetch, with
its default retries (`sdk.WEB_IDENTITY`); nothing between the pod and STS shares or
paces anything.
"""

from __future__ import annotations

import random

from daemon.simulate import sdk
from daemon.simulate.account import AccountSts
from daemon.simulate.pods import Done, Pod
from daemon.simulate.vloop import VirtualTimeLoop


class DirectFetcher:
    def __init__(self, *, loop: VirtualTimeLoop, sts: AccountSts, rng: random.Random,
                 retries: sdk.WebIdentityRetries = sdk.WEB_IDENTITY) -> None:
        self._loop = loop
        self._sts = sts
        self._rng = rng
        self._retries = retries

    def fetch(self, pod: Pod, number: int, done: Done) -> None:
        self._attempt((pod, number, done, 1))

    def _attempt(self, item: tuple[Pod, int, Done, int]) -> None:
        pod, number, done, attempt = item
        if not pod.alive or number != pod.fetch:
            return
        now = self._loop.time()
        admitted = self._sts.call(now)
        self._loop.schedule(now + self._sts.latency, self._answer, (pod, number, done, attempt, admitted))

    def _answer(self, item: tuple[Pod, int, Done, int, bool]) -> None:
        pod, number, done, attempt, admitted = item
        now = self._loop.time()
        if admitted:
            done(pod, number, now + self._retries.session_seconds)
        elif attempt < self._retries.attempts:
            delay = self._retries.delay(attempt, self._rng)
            self._loop.schedule(now + delay, self._attempt, (pod, number, done, attempt + 1))
        else:
            done(pod, number, None)
