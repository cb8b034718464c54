"""`irsa-cache doctor`: walk the chain IRSA crosses (token, OIDC provider, trust policy,
ServiceAccount, pod, STS), check each link, and name the broken one with its fix.

Importing the package is cheap (other parts of the daemon call `command_for`); the
checks, the live fetching and their libraries load only when doctor runs.

    model.py      links, checks, findings (a leaf)
    inputs.py     files as the usual tools print them
    live.py       the same inputs from the cluster and IAM, and STS's verdict (--live)
    facts.py      what the inputs say, and the daemon's verdict on the token's signature
    policy.py     IAM's policy evaluation, pure
    issuers.py    issuer URLs as each system spells them
    checks/       one module per link, run in order
    report.py     text and JSON
    cli.py        flags and exit status
    command.py    the doctor command line that reproduces a failure
"""

from daemon.doctor.command import command_for

__all__ = ["command_for"]
