"""How the clients behave: the AWS SDKs in the pods, and the Go SDK inside a per-pod agent.

Numbers read from the SDKs' source (botocore 1.43: `utils.ContainerMetadataFetcher`,
`credentials.RefreshableCredentials`, `data/_retry.json`, `retryhandler.delay_exponential`;
aws-sdk-go-v2 `aws/retry`: `standard.go`, `jitter_backoff.go`, `retry_token_bucket`).
Only the policy lives here, as values and pure functions of a random draw; `pods.py`
plays it out on the simulation's clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from daemon.backoff import capped


@dataclass(frozen=True, kw_only=True)
class ContainerProvider:
    """botocore's container provider: what a pod does against a node-local endpoint.

    Each attempt waits at most `timeout_seconds`; any answer but 200 (or no answer)
    is a failure, followed by a `sleep_seconds` sleep, also after the last one; after
    `attempts` failures the fetch raises. Status and Retry-After are ignored.
    """

    timeout_seconds: float = 2.0
    attempts: int = 3
    sleep_seconds: float = 1.0


@dataclass(frozen=True, kw_only=True)
class WebIdentityRetries:
    """botocore's web-identity provider calling STS itself, in its default `legacy` retry mode.

    Up to `attempts` calls; Throttling (and 5xx) retried after `rand() * 2 ** (n - 1)`
    seconds, n = 1 for the first retry. (botocore's `standard` mode, opt-in, makes 3
    attempts with `rand() * min(2 ** (n - 1), 20)`.) botocore does not ask for a session
    duration: STS gives its default hour.
    """

    attempts: int = 5
    session_seconds: float = 3600.0

    def delay(self, retry: int, rng: random.Random) -> float:
        return rng.random() * 2 ** (retry - 1)


@dataclass(frozen=True, kw_only=True)
class GoStandardRetries:
    """aws-sdk-go-v2's standard retryer, as a Go node agent calls its credentials service.

    3 attempts; backoff `rand() * 2 ** n` seconds for retry n (1-based), at most 20 s.
    A retry token bucket per client (500 tokens): a retry costs 5, a success refunds what
    its retries cost or adds 1; when the bucket cannot pay, the call fails without retry.
    """

    attempts: int = 3
    max_backoff_seconds: float = 20.0
    quota_tokens: float = 500.0
    retry_cost: float = 5.0
    success_increment: float = 1.0

    def delay(self, retry: int, rng: random.Random) -> float:
        return min(self.max_backoff_seconds, rng.random() * 2**retry)


@dataclass(frozen=True, kw_only=True)
class Refresh:
    """When a pod's SDK fetches again: botocore's windows (JS, Go and Java are close).

    Under `advisory_seconds` left, the next signed call refreshes; if that fails the old
    credentials are used on. Under `mandatory_seconds` left, a failed refresh is an error
    the application sees. A pod makes a signed call at least every `call_gap_seconds`.
    """

    advisory_seconds: float = 900.0
    mandatory_seconds: float = 600.0
    call_gap_seconds: float = 60.0


@dataclass(frozen=True, kw_only=True)
class CrashLoop:
    """A pod whose SDK gave up at start exits and is restarted by the kubelet:
    after 10 s, doubling per restart, at most 5 min."""

    first_seconds: float = 10.0
    max_seconds: float = 300.0

    def delay(self, restarts: int) -> float:
        return capped(self.first_seconds, self.max_seconds, restarts - 1)


CONTAINER_PROVIDER = ContainerProvider()
WEB_IDENTITY = WebIdentityRetries()
GO_STANDARD = GoStandardRetries()
REFRESH = Refresh()
CRASH_LOOP = CrashLoop()
