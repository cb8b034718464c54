"""Every failure a caller can see, each with its HTTP status and a stable code.

A leaf module. The tree:

    DaemonError                      500 internal_error
    ├── RequestError                 400 bad_request
    │   └── WrongHostError           400 wrong_host
    ├── TokenError                   401 (one code per broken link)
    ├── IdentityNotAllowedError      403 (no role, pod not live, ...)
    ├── StsError                     upstream trouble; `permanent` says evict vs. keep serving
    │   ├── StsDeniedError           403 sts_denied      (AccessDenied, IDPRejectedClaim, ...)
    │   ├── StsUnavailableError      502 sts_unavailable (Throttling, 5xx, connection errors)
    │   └── StsTimeoutError          504 sts_timeout
    ├── DirectoryUnavailableError    503 directory_unavailable
    └── OverloadedError              503 overloaded

`server.py` renders them all in one place; messages name the broken link and
never carry a secret or a token.
"""

from __future__ import annotations


class DaemonError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class RequestError(DaemonError):
    """The HTTP request itself is unusable (missing header, oversized token)."""

    status = 400
    code = "bad_request"


class WrongHostError(RequestError):
    """The Host header names none of the listen addresses."""

    code = "wrong_host"


class TokenError(DaemonError):
    """The token is not one we can trust; the code says which check failed."""

    status = 401
    code = "invalid_token"


class IdentityNotAllowedError(DaemonError):
    """The token is valid but this identity may not have credentials here."""

    status = 403
    code = "identity_not_allowed"


class StsError(DaemonError):
    """STS did not give us credentials.

    `permanent` is decided in `sts.py`, next to the client that failed: the cache
    evicts on a permanent error and keeps serving old credentials on a passing one.
    """

    status = 502
    code = "sts_error"
    permanent: bool = False

    def __init__(
        self,
        message: str,
        *,
        sts_code: str | None = None,
        permanent: bool | None = None,
        throttled: bool = False,
    ) -> None:
        super().__init__(message)
        self.sts_code = sts_code
        self.throttled = throttled
        if permanent is not None:
            self.permanent = permanent


class StsDeniedError(StsError):
    status = 403
    code = "sts_denied"
    permanent = True


class StsUnavailableError(StsError):
    status = 502
    code = "sts_unavailable"


class StsTimeoutError(StsError):
    status = 504
    code = "sts_timeout"


class DirectoryUnavailableError(DaemonError):
    """The directory cannot answer now (the API server is unreachable, or not yet synced)."""

    status = 503
    code = "directory_unavailable"


class OverloadedError(DaemonError):
    status = 503
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_seconds: int = 1) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ConfigError(Exception):
    """A setting is wrong; raised at start, one clear line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
