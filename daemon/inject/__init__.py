"""`irsa-cache inject`: the webhook's change, made to workload YAML before it is applied.

    irsa-cache inject -f app.yaml | kubectl apply -f -

For GitOps and for clusters without the webhook. It reads Kubernetes YAML (a file, or
stdin; any number of documents) and writes it to stdout with every pod and pod
template pointed at irsa-cache by the same function the webhook uses
(`daemon.webhook.mutation.mutate`). Without a cluster to ask, a ServiceAccount has a
role when the input declares it with the role annotation, or when `--role
NAMESPACE/NAME=ROLE_ARN` says so. Everything in the input counts as opted in, except
pods annotated `irsa-cache.io/inject: "false"`; the other rules are the webhook's
(Fargate, Windows, the daemon's namespace, skip-containers, containers that set the
variables themselves). Documents it does not change come out as they went in, byte
for byte; changed ones keep their comments, key order and fields it does not know.
What it did to each workload goes to stderr, one line each.

Bad input (YAML that does not parse, a `--role` that is not NAMESPACE/NAME=ARN, a file
that cannot be read) is one line on stderr and exit status 2, with nothing on stdout.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.config import read_options
from daemon.errors import ConfigError
from daemon.inject import documents, workloads
from daemon.webhook import mutation, patch
from daemon.webhook.settings import (
    INJECTION_OPTIONS,
    add_injection_options,
    injection_settings,
    parse_namespace,
)

DEFAULT_NAMESPACE = "default"
_ROLE = re.compile(r"(?P<namespace>[^/=\s]+)/(?P<name>[^/=\s]+)=(?P<arn>\S+)")

Account = tuple[str, str]  # (namespace, name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", metavar="FILE",
                        help="Kubernetes YAML to read; '-' or nothing reads stdin")
    parser.add_argument("-f", "--filename", metavar="FILE", help="the same, as kubectl names it")
    parser.add_argument("--role", action="append", default=[], metavar="NAMESPACE/SERVICEACCOUNT=ROLE_ARN",
                        help="this ServiceAccount has a role (repeatable); ServiceAccounts in the input "
                             "with the role annotation count without it")
    parser.add_argument("-n", "--namespace", metavar="NAMESPACE",
                        help=f"namespace of objects that name none, as kubectl's (default: {DEFAULT_NAMESPACE})")
    add_injection_options(parser)


@dataclass(frozen=True, kw_only=True)
class Report:
    """What became of one pod or pod template."""

    workload: str
    outcome: mutation.Outcome
    reason: str

    def __str__(self) -> str:
        return f"irsa-cache: {self.workload}: {self.outcome.value}: {self.reason}"


def parse_roles(values: Sequence[str], settings: mutation.InjectionSettings) -> dict[Account, str]:
    roles: dict[Account, str] = {}
    problems: list[str] = []
    for value in values:
        match = _ROLE.fullmatch(value.strip())
        if match is None:
            problems.append(f"--role {value!r}: expected NAMESPACE/SERVICEACCOUNT=ROLE_ARN, "
                            "such as shop/checkout=arn:aws:iam::111122223333:role/checkout")
            continue
        account = {"metadata": {"namespace": match["namespace"], "name": match["name"],
                                "annotations": {settings.role_annotation: match["arn"]}}}
        role_arn, why = mutation.role_arn_of(account, settings)
        if role_arn is None:
            problems.append(f"--role {value!r}: {match['arn']!r} is not an IAM role ARN "
                            "(arn:aws:iam::ACCOUNT:role/NAME)")
            continue
        roles[(match["namespace"], match["name"])] = role_arn
    if problems:
        raise ConfigError(problems)
    return roles


def inject(
    stream: documents.Stream, *, roles: Mapping[Account, str], settings: mutation.InjectionSettings,
    default_namespace: str,
) -> list[Report]:
    """Mutate every pod template of `stream` in place; one Report per pod template."""
    known: dict[Account, tuple[str | None, str]] = {}
    for document in stream.documents:
        for account, obj in workloads.service_accounts(documents.plain(document.content),
                                                       default_namespace=default_namespace):
            known[account] = mutation.role_arn_of(obj, settings)
    for account, given in roles.items():
        known[account] = (given, f"--role {account[0]}/{account[1]}")

    reports: list[Report] = []
    for document in stream.documents:
        content = documents.plain(document.content)
        for template in workloads.pod_templates(content, default_namespace=default_namespace):
            pod = _at(content, template.path)
            account = (template.namespace, mutation.service_account_of(pod))
            role_arn, why = known.get(account, (
                None, f"ServiceAccount {account[0]}/{account[1]} is not in the input, and no --role names it"))
            result = mutation.mutate(pod, namespace=template.namespace, role_arn=role_arn, settings=settings,
                                     no_role_reason=why)
            if result.changed:
                node = documents.walk(document.content, template.path)
                documents.apply(node, patch.difference(pod, result.pod))
                document.changed = True
            reports.append(Report(workload=template.label, outcome=result.outcome, reason=result.reason))
    return reports


def _at(content: Any, path: Sequence[workloads.Key]) -> dict[str, Any]:
    for key in path:
        content = content[key]
    return dict(content)


def _read(args: argparse.Namespace) -> tuple[str, str]:
    if args.source is not None and args.filename is not None:
        raise ConfigError([f"give the input once: {args.source!r} and -f {args.filename!r}"])
    name = args.filename if args.filename is not None else args.source
    if name is None or name == "-":
        return "stdin", sys.stdin.read()
    try:
        with open(name, encoding="utf-8") as file:
            return name, file.read()
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{name}: not UTF-8 text (byte {exc.start})"]) from exc


def main(args: argparse.Namespace) -> int:
    try:
        settings = injection_settings(read_options(INJECTION_OPTIONS, args))
        roles = parse_roles(args.role, settings)
        try:
            default_namespace = parse_namespace(args.namespace or DEFAULT_NAMESPACE)
        except ValueError as exc:
            raise ConfigError([f"--namespace: {exc}"]) from exc
        source, text = _read(args)
        stream = documents.parse(text, source=source)
        reports = inject(stream, roles=roles, settings=settings, default_namespace=default_namespace)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"irsa-cache: error: {problem}", file=sys.stderr)
        return 2
    except documents.YamlInputError as exc:
        print(f"irsa-cache: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(stream.render())
    sys.stdout.flush()
    for report in reports:
        print(report, file=sys.stderr)
    return 0
