"""`doctor --live`: fetch every input that was not given as a file, then ask STS.

In order: the pod and its ServiceAccount (or the ServiceAccount named), the cluster's
issuer and key set, a fresh token by TokenRequest (bound to the pod), the role and the
OIDC providers from IAM, and finally the real AssumeRoleWithWebIdentity with that
token. A file given on the command line always wins over its live counterpart. Each
read's outcome is kept as a finding (`LiveResults.fetches`, by check id) for the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from daemon import sts
from daemon.doctor import aws, issuers, kube
from daemon.doctor.checks.sts import StsAnswer
from daemon.doctor.facts import annotation, pod_account, read_token
from daemon.doctor.inputs import Inputs
from daemon.doctor.model import Finding


@dataclass(frozen=True, kw_only=True)
class Options:
    kubeconfig: Path | None = None
    context: str | None = None
    pod: tuple[str, str] | None = None  # (namespace, name)
    service_account: tuple[str, str] | None = None
    sts_endpoint_url: str | None = None
    iam_endpoint_url: str | None = None


@dataclass(frozen=True, kw_only=True)
class LiveResults:
    fetches: Mapping[str, Finding] = field(default_factory=dict)  # check id -> what the read found
    sts: StsAnswer | None = None
    sts_skip: str = "not called"  # why STS was not called, when it was not


async def _from_cluster(options: Options, given: Inputs, fetches: dict[str, Finding]) -> Inputs:
    pod, account = given.pod, given.service_account
    token, issuer, key_set = given.token, given.cluster_issuer, given.key_set
    async with kube.connect(options.kubeconfig, options.context) as cluster:
        pod_read_live = False
        if options.pod is not None and pod is None:
            read = await cluster.read_pod(*options.pod)
            fetches["pod.read"], pod, pod_read_live = read.finding, read.value, read.value is not None
        wanted = options.service_account
        if wanted is None and pod is not None:
            namespace, name = pod_account(pod)
            wanted = (namespace or (options.pod[0] if options.pod else "default"), name)
        if wanted is not None and account is None:
            read = await cluster.read_service_account(*wanted)
            fetches["service-account.read"], account = read.finding, read.value
        if issuer is None or key_set is None:
            read = await cluster.discovery()
            fetches["token.discovery"] = read.finding
            if read.value is not None:
                issuer = issuer or read.value[0]
                key_set = key_set if key_set is not None else read.value[1]
        if token is None and account is not None and wanted is not None:
            read = await cluster.request_token(*wanted, given.audience, pod if pod_read_live else None)
            fetches["token.request"], token = read.finding, read.value
    return dataclasses.replace(
        given, pod=pod, service_account=account, cluster_issuer=issuer, key_set=key_set,
        key_set_source=given.key_set_source if given.key_set is not None else "the API server's /openid/v1/jwks",
        token=token, token_source=given.token_source if given.token is not None else "TokenRequest",
    )


async def fetch(options: Options, given: Inputs) -> tuple[Inputs, LiveResults]:
    """The inputs completed from the cluster and IAM, and what STS answered."""
    fetches: dict[str, Finding] = {}
    inputs = given
    if options.pod is not None or options.service_account is not None:
        inputs = await _from_cluster(options, given, fetches)

    session = aws.session()
    role_arn = inputs.role_arn or (inputs.role.arn if inputs.role else None) or annotation(
        inputs.service_account, f"{inputs.annotation_prefix}/role-arn")
    if inputs.trust_policy is None and role_arn:
        read = await aws.read_role(role_arn, session=session, endpoint_url=options.iam_endpoint_url)
        fetches["trust-policy.read"] = read.finding
        if read.value is not None:
            document, role = read.value
            inputs = dataclasses.replace(inputs, trust_policy=document, role=role)
    if inputs.providers is None:
        read = await aws.read_providers(session=session, endpoint_url=options.iam_endpoint_url)
        fetches["provider.read"] = read.finding
        if read.value is not None:
            inputs = dataclasses.replace(inputs, providers=read.value)

    answer, skip = None, ""
    token = read_token(inputs.token) if inputs.token is not None else None
    subject = token.claim("sub") if token and token.problem is None else None
    issuer = token.claim("iss") if token and token.problem is None else inputs.cluster_issuer
    eks = issuers.eks_parts(issuer) if isinstance(issuer, str) else None
    region = inputs.region or (eks[0] if eks else None)
    if token is None or not isinstance(subject, str):
        skip = "no usable token to present (give --token, or --live with --pod-name / --service-account-name)"
    elif not role_arn or issuers.role_parts(role_arn) is None:
        skip = "no role ARN to assume (give --role-arn, or annotate the ServiceAccount)"
    elif region is None:
        skip = "no region for STS (give --region, or set AWS_REGION)"
    else:
        answer = await aws.assume_role(role_arn=role_arn, token=token.text, session_name=sts.session_name_for(subject),
                                       region=region, session=session, endpoint_url=options.sts_endpoint_url)
    if region and inputs.region is None:
        inputs = dataclasses.replace(inputs, region=region)
    return inputs, LiveResults(fetches=fetches, sts=answer, sts_skip=skip)
