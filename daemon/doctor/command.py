"""The doctor command line that checks one identity's chain, for error messages.

The daemon's 403/502 answers can end with "run: irsa-cache doctor --live ...", so the
operator who reads the failure gets the command that names its broken link. A leaf:
it imports nothing from the package, and nothing heavy.
"""

from __future__ import annotations

import shlex

DEFAULT_AUDIENCE = "sts.amazonaws.com"


def command_for(*, namespace: str | None, service_account: str | None = None, pod: str | None = None,
                role_arn: str | None = None, audience: str | None = None) -> str:
    """`irsa-cache doctor --live ...` for the pod (or, without one, the ServiceAccount) of a
    namespace, and the role the daemon used; shell-quoted, ready to paste."""
    argv = ["irsa-cache", "doctor", "--live"]
    if namespace and pod:
        argv += ["--pod-name", f"{namespace}/{pod}"]
    elif namespace and service_account:
        argv += ["--service-account-name", f"{namespace}/{service_account}"]
    if role_arn:
        argv += ["--role-arn", role_arn]
    if audience and audience != DEFAULT_AUDIENCE:
        argv += ["--audience", audience]
    return shlex.join(argv)
