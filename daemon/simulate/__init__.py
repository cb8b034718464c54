"""`irsa-cache simulate`: a whole cluster's STS traffic on a virtual clock, before it happens.

A discrete-event simulation. Every node runs the daemon's own `CredentialCache` and
`StsBudget` (`adapter.py`, the one module that knows their API), on an asyncio loop
whose time jumps to the next event (`vloop.py`); pods behave as the AWS SDKs do
(`sdk.py`, `pods.py`); STS is one token bucket for the account (`account.py`). The same
cluster (`inputs.plan()`) is played three times: pods calling STS directly
(`direct.py`), a node agent caching per pod (`per_pod.py`), and irsa-cache
(`irsa_cache.py`); `report.py` and `plot.py` put them side by side.
"""
