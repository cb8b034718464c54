"""`irsa-cache doctor`: its flags, and the run from flags to exit status.

Exit status: 0 when no check failed (warnings included), 1 when one did, 2 when an
input cannot be read at all (one line on stderr, nothing checked).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.doctor import inputs
from daemon.doctor.model import InputError

if TYPE_CHECKING:
    from daemon.doctor.facts import Facts
    from daemon.doctor.model import Result

# The checks and their libraries load when doctor runs, not when `irsa-cache serve` builds its parser.

DESCRIPTION = """Walk the chain IRSA crosses (the token and its issuer's keys, the OIDC provider in IAM, the
role's trust policy, the ServiceAccount, the pod, STS), check each link, and name the broken one
with its fix. Give the files you have (every input is optional), or --live to fetch them with your
kubeconfig and AWS credentials; --live also calls STS AssumeRoleWithWebIdentity for real."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    given = parser.add_argument_group("inputs (files; each optional)")
    given.add_argument("--token", type=Path, metavar="FILE", help="a projected service-account token")
    given.add_argument("--jwks", type=Path, metavar="FILE", help="the issuer's key set (kubectl get --raw /openid/v1/jwks)")
    given.add_argument("--role-arn", metavar="ARN", help="the role to check (default: the ServiceAccount's annotation)")
    given.add_argument("--trust-policy", type=Path, metavar="FILE",
                       help="the role's trust policy, or `aws iam get-role` output")
    given.add_argument("--oidc-providers", type=Path, metavar="FILE",
                       help="IAM's OIDC providers: a JSON list of {Arn, Url, ClientIDList} (one object will do)")
    given.add_argument("--service-account", type=Path, metavar="FILE", help="the ServiceAccount, YAML or JSON")
    given.add_argument("--pod", type=Path, metavar="FILE", help="the pod (or its Deployment, Job, ...), YAML or JSON")
    given.add_argument("--cluster-issuer", metavar="URL",
                       help="the cluster's issuer (aws eks describe-cluster --query cluster.identity.oidc.issuer)")
    given.add_argument("--audience", default=inputs.DEFAULT_AUDIENCE,
                       help=f"the audience STS and the daemon are given (default: {inputs.DEFAULT_AUDIENCE})")
    given.add_argument("--region", help="AWS region for STS (default: AWS_REGION, AWS_DEFAULT_REGION, the EKS issuer's)")
    given.add_argument("--annotation-prefix", default=inputs.DEFAULT_ANNOTATION_PREFIX,
                       help=f"the role annotation is <prefix>/role-arn (default: {inputs.DEFAULT_ANNOTATION_PREFIX})")
    live = parser.add_argument_group("live (mints real role credentials; see the README for the permissions)")
    live.add_argument("--live", action="store_true",
                      help="fetch what was not given from the cluster and IAM, then call STS for real")
    target = live.add_mutually_exclusive_group()
    target.add_argument("--pod-name", metavar="NS/NAME", help="the pod to check (with --live)")
    target.add_argument("--service-account-name", metavar="NS/NAME", help="the ServiceAccount to check (with --live)")
    live.add_argument("--kubeconfig", type=Path, metavar="FILE", help="default: KUBECONFIG, ~/.kube/config, in-cluster")
    live.add_argument("--context", help="kubeconfig context (default: the current one)")
    live.add_argument("--sts-endpoint-url", metavar="URL", help="default: AWS_ENDPOINT_URL_STS, then the regional one")
    live.add_argument("--iam-endpoint-url", metavar="URL", help="default: AWS_ENDPOINT_URL_IAM, then IAM's")
    parser.add_argument("--json", action="store_true", help='print {"checks": [...], "ok": bool}')
    parser.add_argument("--list-checks", action="store_true", help="list every check (id, link, what it catches)")


def _namespaced(text: str | None, flag: str) -> tuple[str, str] | None:
    if text is None:
        return None
    namespace, _, name = text.partition("/")
    if not namespace or not name or "/" in name:
        raise InputError(f"{flag} {text!r}: expected NAMESPACE/NAME")
    return namespace, name


def read_files(args: argparse.Namespace, environ: Mapping[str, str]) -> inputs.Inputs:
    """The offline inputs; InputError for a file that cannot be read."""
    trust_policy, role = (inputs.read_trust_policy(args.trust_policy) if args.trust_policy else (None, None))
    pod, template = inputs.read_pod(args.pod) if args.pod else (None, False)
    return inputs.Inputs(
        token=inputs.read_token(args.token) if args.token else None,
        token_source="--token",
        key_set=inputs.read_key_set(args.jwks) if args.jwks else None,
        key_set_source=f"--jwks {args.jwks}",
        trust_policy=trust_policy,
        role=role,
        providers=inputs.read_providers(args.oidc_providers) if args.oidc_providers else None,
        service_account=inputs.read_service_account(args.service_account) if args.service_account else None,
        pod=pod,
        pod_is_template=template,
        cluster_issuer=args.cluster_issuer.rstrip() if args.cluster_issuer else None,
        role_arn=args.role_arn,
        audience=args.audience,
        annotation_prefix=args.annotation_prefix,
        region=args.region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION"),
    )


async def diagnose(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[list[Result], Facts]:
    """Read (and with --live fetch) the inputs, gather the facts, run every check."""
    from daemon.doctor import checks, facts

    given = read_files(args, environ)
    live_results = None
    if args.live:
        from daemon.doctor import live  # kubernetes-asyncio and aiobotocore: only for --live

        options = live.Options(
            kubeconfig=args.kubeconfig, context=args.context,
            pod=_namespaced(args.pod_name, "--pod-name"),
            service_account=_namespaced(args.service_account_name, "--service-account-name"),
            sts_endpoint_url=args.sts_endpoint_url or environ.get("AWS_ENDPOINT_URL_STS") or None,
            iam_endpoint_url=args.iam_endpoint_url or environ.get("AWS_ENDPOINT_URL_IAM") or None,
        )
        given, live_results = await live.fetch(options, given)
    elif args.pod_name or args.service_account_name:
        raise InputError("--pod-name and --service-account-name need --live")
    found = await facts.gather(given, now=time.time(), key_set_path=args.jwks, live=live_results)
    return checks.run(found, live=args.live), found


def list_checks() -> str:
    from daemon.doctor import checks

    return "\n".join(f"{check.id:<32} {check.link.value:<16} {check.catches}" for check in checks.CHECKS)


async def run(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[int, str, str]:
    """(exit status, report, error line) for parsed arguments."""
    from daemon.doctor import report

    if args.list_checks:
        return 0, list_checks(), ""
    try:
        results, found = await diagnose(args, environ)
    except InputError as exc:
        return 2, "", f"irsa-cache doctor: error: {exc}"
    return report.exit_status(results), report.as_json(results) if args.json else report.as_text(results, found), ""


def main(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """`irsa-cache doctor`: prints the report (or the one error line), returns the exit status."""
    status, out, error = asyncio.run(run(args, os.environ if environ is None else environ))
    if out:
        print(out)
    if error:
        print(error, file=sys.stderr)
    return status


def parser() -> argparse.ArgumentParser:
    """`irsa-cache doctor` alone: what tests and `command_for` round-trips use."""
    built = argparse.ArgumentParser(prog="irsa-cache doctor", description=DESCRIPTION)
    add_arguments(built)
    return built
