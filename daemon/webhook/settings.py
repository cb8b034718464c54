"""The flags of `irsa-cache webhook` and `irsa-cache inject`, their defaults, validated.

Both commands share the flags that shape the injected token (`--audience`,
`--token-expiration`, `--annotation-prefix`, `--daemon-namespace`), so a pod gets the
same change from either. As for `serve`, each flag can also come from the environment
as `IRSA_CACHE_<FLAG>`, a flag on the command line wins, and every bad value is
reported on a line of its own (ConfigError: exit status 2).

The webhook's fixed policy (how long a ServiceAccount is waited for, how often the
certificate files are looked at) is here too, in one place.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import Address, Option, add_options, parse_address, parse_choice, parse_duration, read_options
from daemon.errors import ConfigError
from daemon.webhook import mutation

# A ServiceAccount created together with its pods may not be readable yet when the
# first pod is admitted: look again for this long before calling it missing.
SERVICE_ACCOUNT_GRACE_SECONDS = 1.0
SERVICE_ACCOUNT_RETRY_SECONDS = 0.2
SERVICE_ACCOUNT_REQUEST_SECONDS = 2.0  # one read of a ServiceAccount
# The whole answer, lookups included, well inside the configuration's timeoutSeconds (5).
ADMISSION_DEADLINE_SECONDS = 3.5
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # an AdmissionReview holds a whole pod (etcd caps objects at 1.5 MiB)
TLS_RELOAD_INTERVAL_SECONDS = 10.0  # kubelet refreshes a mounted Secret within about a minute
SHUTDOWN_GRACE_SECONDS = 5.0  # for requests in flight when the listener closes


def parse_token_expiration(text: str) -> int:
    seconds = parse_duration(text)
    if seconds != int(seconds) or not (
            mutation.MIN_TOKEN_EXPIRATION_SECONDS <= seconds <= mutation.MAX_TOKEN_EXPIRATION_SECONDS):
        raise ValueError(
            f"{text!r} must be whole seconds from {mutation.MIN_TOKEN_EXPIRATION_SECONDS} "
            "(the API server's minimum for a projected token)")
    return int(seconds)


def parse_audience(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text):
        raise ValueError(f"{text!r} is not an audience (one word, such as sts.amazonaws.com)")
    return text


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def parse_namespace(text: str) -> str:
    if not _DNS_LABEL.fullmatch(text):
        raise ValueError(f"{text!r} is not a namespace name (lower-case letters, digits and '-')")
    return text


def parse_prefix(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", text):
        raise ValueError(f"{text!r} is not an annotation prefix (a DNS subdomain, such as eks.amazonaws.com)")
    return text


INJECTION_OPTIONS: tuple[Option, ...] = (
    Option("--audience", parse_audience, mutation.DEFAULT_AUDIENCE,
           "audience of the projected token; the daemon's --audience must be the same"),
    Option("--token-expiration", parse_token_expiration, str(mutation.DEFAULT_TOKEN_EXPIRATION_SECONDS),
           "lifetime of the projected token (the kubelet renews it at 80%%)", metavar="SECONDS"),
    Option("--annotation-prefix", parse_prefix, "eks.amazonaws.com",
           "a ServiceAccount has a role when it carries <prefix>/role-arn (the daemon's flag of that name)",
           metavar="PREFIX"),
    Option("--daemon-namespace", parse_namespace, "irsa-cache",
           "namespace of irsa-cache itself, whose pods are never changed", metavar="NAMESPACE"),
)

WEBHOOK_OPTIONS: tuple[Option, ...] = (
    Option("--listen", parse_address, "0.0.0.0:8443", "HTTPS address of POST /mutate", metavar="HOST:PORT"),
    Option("--tls-cert", Path, None, "serving certificate (PEM, chain after the leaf); reread when it changes",
           metavar="FILE"),
    Option("--tls-key", Path, None, "private key of the serving certificate (PEM)", metavar="FILE"),
    Option("--kubeconfig", Path, None, "API server access (default: in-cluster service account)", metavar="FILE"),
    Option("--metrics-listen", parse_address, "0.0.0.0:9464", "/metrics, /healthz and /readyz", metavar="HOST:PORT"),
    # Until the Service drops a terminating pod from its endpoints, the API server still
    # sends it requests; one that found nobody would create its pod without credentials.
    Option("--drain", parse_duration, "5", "on SIGTERM, /readyz says 503 and requests are answered this long, "
           "then the webhook stops", metavar="SECONDS"),
    *INJECTION_OPTIONS,
    Option("--log-level", parse_choice("debug", "info", "warning", "error"), "info", "log level"),
)


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    listen: Address
    metrics_listen: Address
    tls_cert: Path
    tls_key: Path
    kubeconfig: Path | None
    injection: mutation.InjectionSettings
    log_level: str = "info"
    drain_seconds: float
    tls_reload_interval_seconds: float = TLS_RELOAD_INTERVAL_SECONDS


def add_webhook_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, WEBHOOK_OPTIONS)


def add_injection_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, INJECTION_OPTIONS)


def injection_settings(values: Mapping[str, Any]) -> mutation.InjectionSettings:
    return mutation.InjectionSettings(
        audience=values["audience"],
        token_expiration_seconds=values["token_expiration"],
        annotation_prefix=values["annotation_prefix"],
        daemon_namespace=values["daemon_namespace"],
    )


def webhook_settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> WebhookSettings:
    values = read_options(WEBHOOK_OPTIONS, args, environ)
    problems: list[str] = []
    for flag, dest in (("--tls-cert", "tls_cert"), ("--tls-key", "tls_key")):
        path = values[dest]
        if path is None:
            problems.append(f"{flag}: required (the webhook serves HTTPS only; the API server calls nothing else)")
        elif not path.is_file():
            problems.append(f"{flag}: {path} is not a readable file")
    if values["kubeconfig"] is not None and not values["kubeconfig"].is_file():
        problems.append(f"--kubeconfig: {values['kubeconfig']} is not a readable file")
    if problems:
        raise ConfigError(problems)
    return WebhookSettings(
        listen=values["listen"],
        metrics_listen=values["metrics_listen"],
        tls_cert=values["tls_cert"],
        tls_key=values["tls_key"],
        kubeconfig=values["kubeconfig"],
        injection=injection_settings(values),
        log_level=values["log_level"],
        drain_seconds=values["drain"],
    )


def parse_webhook_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> WebhookSettings:
    """Parse `webhook` flags alone: what tests and the manifest check use."""
    parser = argparse.ArgumentParser(prog="irsa-cache webhook")
    add_webhook_options(parser)
    return webhook_settings_from(parser.parse_args(list(argv)), environ)
