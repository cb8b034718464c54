"""From the inputs to the facts every check reads: who the identity is, which issuer,
provider and role are in play, the token's claims, and the daemon's own verdict on
the token's signature.

Each fact records where it came from (the token, a flag, the ServiceAccount), so a
message can say why doctor believes it. The signature is judged by the daemon's own
`tokens.TokenVerifier` (the only I/O here, against an in-memory or file key source);
everything else is pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon import config, jws, sts, tokens
from daemon.directory.kubernetes import SUBJECT
from daemon.doctor import issuers, policy
from daemon.doctor.inputs import DEFAULT_AUDIENCE, Inputs, Obj
from daemon.doctor.issuers import Provider
from daemon.doctor.policy import Decision, Policy, Request
from daemon.errors import TokenError

WEB_IDENTITY_ACTION = "sts:AssumeRoleWithWebIdentity"
# Codes of tokens.TokenVerifier raised only after the signature verified (claims checks).
CLAIM_CODES = frozenset({"wrong_issuer", "wrong_audience", "expired_token", "token_not_yet_valid"})


@dataclass(frozen=True, kw_only=True)
class Token:
    """The token as read, and what it says (unverified: the signature is a separate fact)."""

    text: str  # without trailing whitespace, as doctor hands it to the verifier and STS
    line_break: bool  # the file had CR or LF in it: every SDK refuses such a token
    header: Mapping[str, Any] | None
    claims: Mapping[str, Any] | None
    problem: str | None  # why it is not a JWT

    def claim(self, name: str) -> Any:
        return (self.claims or {}).get(name)

    @property
    def audiences(self) -> list[str] | None:
        aud = self.claim("aud")
        if isinstance(aud, str):
            return [aud]
        if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            return list(aud)
        return None

    def kubernetes(self, *path: str) -> Any:
        value: Any = self.claim("kubernetes.io")
        for part in path:
            value = value.get(part) if isinstance(value, Mapping) else None
        return value


def read_token(raw: str) -> Token:
    text = raw.rstrip("\r\n \t")
    line_break = "\n" in raw or "\r" in raw
    if not text:
        return Token(text=text, line_break=line_break, header=None, claims=None, problem="the token is empty")
    try:  # read as the daemon reads it: what it refuses is not a JWT here either
        compact = jws.parse(text)
        claims = jws.payload(compact)
    except jws.MalformedError as exc:
        return Token(text=text, line_break=line_break, header=None, claims=None, problem=str(exc))
    return Token(text=text, line_break=line_break, header=compact.header, claims=claims, problem=None)


@dataclass(frozen=True, kw_only=True)
class KeySet:
    usable: tuple[str, ...]  # kids of the keys the daemon would trust
    skipped: tuple[str, ...]  # why each other key is not trusted, in the daemon's words
    problem: str | None  # the document is not a key set at all


def read_key_set(document: Any) -> KeySet:
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list) or not all(
            isinstance(key, Mapping) for key in document["keys"]):
        return KeySet(usable=(), skipped=(), problem='not a JSON Web Key Set (an object with a "keys" list)')
    skipped: list[str] = []  # why each key the daemon would not trust is skipped, in its words
    keys = tokens.parse_key_set(document, skipped)
    return KeySet(usable=tuple(str(kid) for kid in keys), skipped=tuple(skipped), problem=None)


@dataclass(frozen=True, kw_only=True)
class Signature:
    verified: bool
    code: str | None  # the daemon's TokenError code when not verified
    message: str


class _DocumentKeySource:
    """A key set already read (fetched live, or from a file read once)."""

    def __init__(self, document: Mapping[str, Any], description: str) -> None:
        self._document = document
        self.description = description

    async def fetch(self) -> Mapping[str, Any]:
        return self._document


async def verify_signature(token: Token, key_source: tokens.KeySource) -> Signature:
    """The daemon's TokenVerifier on this token, with the claims it checks after the signature
    set to pass (its own issuer and audience, a clock inside its lifetime): what is left is
    the signature, the key and the algorithm."""
    iss = token.claim("iss")
    audiences = token.audiences or [DEFAULT_AUDIENCE]
    verifier = tokens.TokenVerifier(
        issuer=iss if isinstance(iss, str) else "(no iss)",
        audience=audiences[0],
        key_source=key_source,
        clock=lambda: _inside_lifetime(token),
        leeway_seconds=config.TOKEN_LEEWAY_SECONDS,
        refetch_min_interval_seconds=config.JWKS_REFETCH_MIN_INTERVAL_SECONDS,
        max_verified=1,
    )
    try:
        await verifier.load_keys(skipped=[])  # the keys it skips are the key-set check's to show, not the log's
    except Exception as exc:  # the daemon refuses to start on this too
        return Signature(verified=False, code="no_usable_key", message=str(exc))
    try:
        await verifier.verify(token.text)
    except TokenError as exc:
        claim_level = exc.code in CLAIM_CODES or (exc.code == "malformed_token" and exc.message.startswith("claim"))
        if not claim_level:
            return Signature(verified=False, code=exc.code, message=exc.message)
    kid = (token.header or {}).get("kid")
    return Signature(verified=True, code=None,
                     message=f"signed with {(token.header or {}).get('alg')} by key {kid!r} of {key_source.description}")


def _inside_lifetime(token: Token) -> float:
    nbf, exp = token.claim("nbf"), token.claim("exp")
    if isinstance(nbf, (int, float)) and not isinstance(nbf, bool):
        return float(nbf)
    if isinstance(exp, (int, float)) and not isinstance(exp, bool):
        return float(exp) - 1
    return 0.0


@dataclass(frozen=True, kw_only=True)
class Sourced:
    """A value and where doctor found it."""

    value: str
    source: str


@dataclass(frozen=True, kw_only=True)
class Facts:
    inputs: Inputs
    now: float
    token: Token | None
    key_set: KeySet | None
    signature: Signature | None
    subject: Sourced | None
    issuer: Sourced | None
    role_arn: Sourced | None
    provider: Provider | None  # the registered provider STS would pick for the issuer
    provider_arn: str | None  # that provider's ARN, or the ARN it would have
    policy: Policy | None
    policy_problem: str | None
    request: Request | None
    decision: Decision | None
    live: Any = None  # live.LiveResults when run with --live

    @property
    def audience(self) -> str:
        return self.inputs.audience

    @property
    def role_annotation(self) -> str:
        return f"{self.inputs.annotation_prefix}/role-arn"

    @property
    def condition_prefix(self) -> str | None:
        return issuers.condition_prefix(self.issuer.value) if self.issuer else None

    @property
    def role_name(self) -> str | None:
        parts = issuers.role_parts(self.role_arn.value) if self.role_arn else None
        return parts[2] if parts else None


def subject_of_account(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def account_of_subject(subject: str) -> tuple[str, str] | None:
    found = SUBJECT.fullmatch(subject)
    return (found.group(1), found.group(2)) if found else None


def pod_account(pod: Obj) -> tuple[str | None, str]:
    return (pod.get("metadata") or {}).get("namespace"), (pod.get("spec") or {}).get("serviceAccountName") or "default"


def _subject(inputs: Inputs, token: Token | None) -> Sourced | None:
    sub = token.claim("sub") if token else None
    if isinstance(sub, str) and sub:
        return Sourced(value=sub, source=f"the token's sub ({inputs.token_source})")
    account = inputs.service_account
    if account:
        meta = account.get("metadata") or {}
        if meta.get("namespace") and meta.get("name"):
            return Sourced(value=subject_of_account(meta["namespace"], meta["name"]), source="the ServiceAccount")
    if inputs.pod:
        namespace, name = pod_account(inputs.pod)
        if namespace:
            return Sourced(value=subject_of_account(namespace, name), source="the pod's serviceAccountName")
    return None


def _issuer(inputs: Inputs, token: Token | None) -> Sourced | None:
    iss = token.claim("iss") if token else None
    if isinstance(iss, str) and iss:
        if inputs.cluster_issuer and iss != inputs.cluster_issuer:
            # The token is the broken link (token.issuer says so); the rest of the chain is the cluster's.
            return Sourced(value=inputs.cluster_issuer, source="--cluster-issuer (the token's iss differs)")
        return Sourced(value=iss, source=f"the token's iss ({inputs.token_source})")
    if inputs.cluster_issuer:
        return Sourced(value=inputs.cluster_issuer, source="--cluster-issuer")
    return None


def annotation(obj: Obj | None, key: str) -> str | None:
    value = (((obj or {}).get("metadata") or {}).get("annotations") or {}).get(key)
    return value if isinstance(value, str) else None


def _role_arn(inputs: Inputs) -> Sourced | None:
    if inputs.role_arn:
        return Sourced(value=inputs.role_arn, source="--role-arn")
    if inputs.role and inputs.role.arn:
        return Sourced(value=inputs.role.arn, source="the role (get-role)")
    annotated = annotation(inputs.service_account, f"{inputs.annotation_prefix}/role-arn")
    if annotated and issuers.role_parts(annotated):
        return Sourced(value=annotated, source="the ServiceAccount's annotation")
    return None


def _provider_arn(inputs: Inputs, issuer: Sourced | None, provider: Provider | None,
                  role_arn: Sourced | None, document: Policy | None) -> str | None:
    if provider is not None and provider.arn.startswith("arn:"):
        return provider.arn
    if issuer is None:
        return None
    role = issuers.role_parts(role_arn.value) if role_arn else None
    if role:
        return issuers.provider_arn(partition=role[0], account=role[1], issuer=issuer.value)
    for statement in document.statements if document else ():
        for arn in statement.federated():
            if issuers.provider_url_of_arn(arn) == issuers.without_scheme(issuer.value):
                return arn
    return None


def audience_in_context(token: Token | None, provider: Provider | None, configured: str) -> str:
    """The value of the `<issuer>:aud` key STS puts in the request: `azp` when the token has
    one, else the audience that matched one of the provider's client IDs. A token without a
    matching audience never reaches the trust policy (token.audience fails); the policy is
    then judged for the configured audience, the one a corrected token would carry."""
    if token is not None:
        azp = token.claim("azp")
        if isinstance(azp, str):
            return azp
        client_ids = set(provider.client_ids or ()) if provider else {configured}
        for audience in token.audiences or []:
            if audience in client_ids:
                return audience
    return configured


def request_context(*, prefix: str, subject: str, audience: str, now: float, region: str | None) -> policy.Context:
    values = {
        f"{prefix}:sub": (subject,),
        f"{prefix}:aud": (audience,),
        "sts:RoleSessionName": (sts.session_name_for(subject),),  # what the daemon sends
        "aws:CurrentTime": (datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),),
        "aws:EpochTime": (str(int(now)),),
        "aws:SecureTransport": ("true",),
    }
    if region:
        values["aws:RequestedRegion"] = (region,)
    return policy.Context(
        values=values,
        # The daemon passes no session tags, source identity or session policy.
        absent_prefixes=("aws:requesttag/", "aws:tagkeys", "aws:principaltag/", "sts:transitivetagkeys",
                         "sts:sourceidentity", "aws:sourceidentity"),
        # Global keys doctor cannot see from here: the caller's network, the organization.
        unknown_prefixes=("aws:", "sts:"),
    )


async def gather(inputs: Inputs, *, now: float, key_set_path: Path | None = None, live: Any = None) -> Facts:
    """All facts from the inputs; the token's signature through the daemon's verifier."""
    token = read_token(inputs.token) if inputs.token is not None else None
    key_set = read_key_set(inputs.key_set) if inputs.key_set is not None else None
    signature = None
    if token is not None and token.problem is None and key_set is not None and key_set.problem is None:
        source: tokens.KeySource = (tokens.FileKeySource(key_set_path) if key_set_path is not None
                                    else _DocumentKeySource(inputs.key_set or {}, inputs.key_set_source))
        signature = await verify_signature(token, source)

    subject, issuer, role_arn = _subject(inputs, token), _issuer(inputs, token), _role_arn(inputs)
    provider = None
    if issuer is not None:
        provider = next((p for p in inputs.providers or () if p.issuer == issuer.value), None)

    document, problem = None, None
    if inputs.trust_policy is not None:
        try:
            document = policy.parse(inputs.trust_policy)
        except policy.PolicyError as exc:
            problem = str(exc)
    provider_arn = _provider_arn(inputs, issuer, provider, role_arn, document)
    request = decision = None
    if document is not None and subject is not None and issuer is not None and provider_arn is not None:
        context = request_context(
            prefix=issuers.condition_prefix(issuer.value), subject=subject.value,
            audience=audience_in_context(token, provider, inputs.audience), now=now, region=inputs.region)
        request = policy.Request(principal_type="Federated", principal=provider_arn, action=WEB_IDENTITY_ACTION,
                                 context=context)
        decision = policy.evaluate(document, request)
    return Facts(
        inputs=inputs, now=now, token=token, key_set=key_set, signature=signature, subject=subject,
        issuer=issuer, role_arn=role_arn, provider=provider, provider_arn=provider_arn, policy=document,
        policy_problem=problem, request=request, decision=decision, live=live,
    )
