"""Putting pods on irsa-cache without editing them: `irsa-cache webhook` and `irsa-cache inject`.

Both make the same change through one pure function (`mutation.mutate`: a pod in, the
pod pointed at the node's irsa-cache out). The admission webhook turns the difference
into a JSONPatch (`patch.py`) for the API server; `irsa-cache inject` applies it to the
pod templates of workloads in YAML files (`daemon/inject/`).

    mutation.py   what changes in a pod, and when a pod is left alone (pure)
    patch.py      the difference between two pods as operations, and as RFC 6902 JSONPatch
    settings.py   the commands' flags, validated
    accounts.py   does a ServiceAccount carry a role? (the API server, with a grace for new ones)
    tls.py        the serving certificate, reloaded when its files change
    admission.py  AdmissionReview v1 in, AdmissionReview v1 out
    server.py     HTTP: POST /mutate, and /metrics, /healthz, /readyz
    metrics.py    the webhook's Prometheus metrics
    app.py        wiring: the HTTPS listener, the metrics listener, signals
"""
