"""Checks of the token link: is it a JWT, signed by a key of the key set, unexpired,
for the audience STS is given, from the issuer IAM knows, for a service account?

The signature verdict is the daemon's own (`tokens.TokenVerifier`, see facts.py); the
claims are judged here, with the daemon's leeway, and with the words STS would use.
"""

from __future__ import annotations

from datetime import datetime, timezone

from daemon import config
from daemon.doctor import issuers
from daemon.doctor.facts import Facts, account_of_subject, pod_account
from daemon.doctor.model import Check, Finding, Link, failed, passed, skipped, warned

FRESH_TOKEN_FIX = ("take the token the kubelet projects into the pod (its file is rotated), or mint one "
                   "for a test: kubectl create token <serviceaccount> -n <namespace> --audience {audience}")


def utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float) -> str:
    seconds = int(abs(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s"


def _no_token(facts: Facts) -> Finding | None:
    if facts.token is None:
        return skipped("not checked: no token given (--token FILE, or --live)")
    if facts.token.problem is not None:
        return skipped("not checked: the token is not a JWT (see token.jwt)")
    return None


def check_jwt(facts: Facts) -> Finding:
    token = facts.token
    if token is None:
        return skipped("not checked: no token given (--token FILE, or --live)")
    if token.problem is not None:
        return failed(
            f"the token from {facts.inputs.token_source} is not a JWT (three base64url parts joined by dots): "
            f"{token.problem}",
            "give the service-account token itself: the file AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE names in the pod, "
            f"or one minted for a test: kubectl create token <serviceaccount> -n <namespace> --audience {facts.audience}",
        )
    if len(token.text) > config.MAX_TOKEN_CHARS:
        return failed(f"the token has {len(token.text)} characters: STS and the daemon take at most "
                      f"{config.MAX_TOKEN_CHARS}", "give the projected service-account token (about a thousand "
                      "characters), not another file")
    header = token.header or {}
    return passed(f"a JWT signed with {header.get('alg')} (kid {header.get('kid')!r}) from {facts.inputs.token_source}")


def check_key_set(facts: Facts) -> Finding:
    keys = facts.key_set
    if keys is None:
        return skipped("not checked: no key set given (--jwks FILE: the issuer's /openid/v1/jwks, or --live)")
    fetch = "kubectl get --raw /openid/v1/jwks > jwks.json (or <issuer>/keys for EKS)"
    if keys.problem is not None:
        return failed(f"{facts.inputs.key_set_source}: {keys.problem}", f"give the issuer's key set: {fetch}")
    skipped_keys = f"; not trusted: {'; '.join(keys.skipped)}" if keys.skipped else ""
    if not keys.usable:
        return failed(f"{facts.inputs.key_set_source} holds no key the daemon would trust{skipped_keys}",
                      f"the issuer must sign with RSA or EC keys (RS256, ES256/384/512); give its key set: {fetch}")
    return passed(f"{len(keys.usable)} signing key(s) the daemon trusts: {', '.join(keys.usable)}{skipped_keys}")


def check_signature(facts: Facts) -> Finding:
    if (missing := _no_token(facts)) is not None:
        return missing
    if facts.key_set is None:
        return skipped("not checked: no key set given (--jwks FILE, or --live)")
    if facts.signature is None or not facts.key_set.usable:
        return skipped("not checked: the key set is unusable (see token.key-set)")
    signature = facts.signature
    if signature.verified:
        return passed(signature.message)
    other_cluster = ("the token and the key set come from different issuers (another cluster, or keys rotated "
                     "since): verify against the key set of the cluster that issued the token "
                     "(kubectl get --raw /openid/v1/jwks on that cluster), or take a token of this cluster")
    if signature.code == "algorithm_not_allowed":
        fix = "the issuer must sign with RS256 or ES256/384/512; the daemon and STS refuse HMAC and none"
    else:
        fix = other_cluster
    return failed(f"the daemon's verifier refuses the token ({signature.code}): {signature.message}", fix)


def check_expiry(facts: Facts) -> Finding:
    if (missing := _no_token(facts)) is not None:
        return missing
    assert facts.token is not None
    exp, nbf = facts.token.claim("exp"), facts.token.claim("nbf")
    fix = FRESH_TOKEN_FIX.format(audience=facts.audience)
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        return failed("the token has no numeric exp claim: STS and the daemon refuse it", fix)
    if facts.now >= exp:
        return failed(
            f"the token expired at {utc(exp)}, {duration(facts.now - exp)} ago "
            f"(STS: \"Token expired: current date/time ... must be before the expiration date/time ...\")",
            fix + "; a projected token that stays expired means the kubelet is not refreshing it (a subPath "
            "mount, or a copy of the token)",
        )
    if isinstance(nbf, (int, float)) and not isinstance(nbf, bool) and facts.now + config.TOKEN_LEEWAY_SECONDS < nbf:
        return failed(f"the token is not valid before {utc(nbf)}, {duration(nbf - facts.now)} from now",
                      "the issuer's clock is ahead of this machine's: check NTP on both")
    return passed(f"valid until {utc(exp)} (in {duration(exp - facts.now)})")


def check_audience(facts: Facts) -> Finding:
    if (missing := _no_token(facts)) is not None:
        return missing
    assert facts.token is not None
    audiences = facts.token.audiences
    fix = (f"project the token with audience {facts.audience} (the pod's projected volume: serviceAccountToken: "
           f"{{audience: {facts.audience}}}); if you use another audience on purpose, give it to the daemon and "
           f"doctor (--audience) and add it to the provider's client IDs")
    if audiences is None:
        return failed("the token has no aud claim (STS: \"Missing a required claim: aud\")", fix)
    if facts.audience not in audiences:
        return failed(f"aud is {audiences}, without {facts.audience!r}, the audience STS and the daemon are "
                      "given (STS: \"Incorrect token audience\"; the daemon: 401 wrong_audience)", fix)
    return passed(f"aud {audiences} includes {facts.audience!r}")


def check_issuer(facts: Facts) -> Finding:
    if (missing := _no_token(facts)) is not None:
        return missing
    assert facts.token is not None
    iss = facts.token.claim("iss")
    if not isinstance(iss, str) or not iss:
        return failed("the token has no iss claim", "the token must come from the cluster's service-account issuer")
    if not iss.startswith("https://"):
        return failed(
            f"iss {iss!r} is not an https URL: IAM registers only https issuers, so STS finds no provider for it",
            "set the API server's --service-account-issuer to an https URL whose /.well-known/openid-configuration "
            "and key set are reachable from the internet (EKS clusters have one), then register that URL in IAM",
        )
    cluster = facts.inputs.cluster_issuer
    if cluster:
        difference = issuers.difference(iss, cluster)
        if difference is None:
            return passed(f"iss {iss} is the cluster's issuer")
        return failed(f"iss {iss} is not the cluster's issuer {cluster}: {difference}",
                      "the token was issued by another cluster (or before the issuer was changed): use a token "
                      "of this cluster; if the cluster's issuer is what changed, register the new one in IAM "
                      "and update the trust policies")
    providers = facts.inputs.providers or ()
    if providers and not any(p.issuer == iss for p in providers):
        near = [(p, issuers.difference(iss, p.issuer)) for p in providers]
        close = [(p, d) for p, d in near if d and d != "another issuer"]
        if close:
            provider, difference = close[0]
            return failed(f"iss {iss} is not the URL of the registered provider {provider.issuer}: {difference}",
                          f"the provider must be registered for exactly {iss}: see provider.registered")
    return passed(f"iss {iss}" + ("" if providers else " (give --cluster-issuer or --oidc-providers to compare)"))


def check_subject(facts: Facts) -> Finding:
    if (missing := _no_token(facts)) is not None:
        return missing
    assert facts.token is not None
    sub = facts.token.claim("sub")
    account = account_of_subject(sub) if isinstance(sub, str) else None
    if account is None:
        return failed(f"sub {sub!r} is not a service account (system:serviceaccount:<namespace>:<name>)",
                      "give a service-account token: IRSA trust policies and the daemon match on that subject")
    namespace, name = account
    given = facts.inputs.service_account
    if given is not None:
        meta = given.get("metadata") or {}
        if (meta.get("namespace"), meta.get("name")) != (namespace, name):
            return failed(f"the token is for {namespace}/{name}, the ServiceAccount given is "
                          f"{meta.get('namespace')}/{meta.get('name')}",
                          "give the token and the ServiceAccount of one identity")
    pod = facts.inputs.pod
    bound = facts.token.kubernetes("pod", "name")
    if pod is not None:
        pod_namespace, pod_sa = pod_account(pod)
        if (pod_namespace, pod_sa) != (namespace, name):
            return failed(f"the token is for {namespace}/{name}, the pod runs as {pod_namespace}/{pod_sa}",
                          "give the token and the pod of one identity")
        pod_name = (pod.get("metadata") or {}).get("name")
        if bound and not facts.inputs.pod_is_template and bound != pod_name:
            return warned(f"the token is bound to pod {bound}, not to the pod given ({pod_name})",
                          "the daemon serves a token only while its own pod is live on the node: take the token "
                          "from the pod you are checking")
    if not bound and facts.inputs.token_source == "--token":
        return warned(f"sub {sub}, but the token is not bound to a pod: irsa-cache --directory kubernetes "
                      "refuses it (403 token_not_pod_bound)",
                      "use the token the kubelet projects into the pod (bound to it), not `kubectl create token`")
    where = f", bound to pod {bound}" if bound else ""
    return passed(f"sub {sub}{where}")


CHECKS = (
    Check(id="token.jwt", link=Link.TOKEN, run=check_jwt,
          catches="the token is not a JWT (empty, truncated, an access token or another file), or is longer "
                  "than STS's 20,000 characters"),
    Check(id="token.key-set", link=Link.TOKEN, run=check_key_set,
          catches="the key set is not a JWKS or holds no key the daemon trusts (HMAC, encryption keys, unknown types)"),
    Check(id="token.signature", link=Link.TOKEN, run=check_signature,
          catches="the signature is not by a key of the key set (another cluster, rotated keys), or uses an "
                  "algorithm the daemon refuses; judged by the daemon's own verifier"),
    Check(id="token.expiry", link=Link.TOKEN, run=check_expiry,
          catches="the token has expired (or is not yet valid)"),
    Check(id="token.audience", link=Link.TOKEN, run=check_audience,
          catches="aud lacks the audience STS and the daemon are given (sts.amazonaws.com by default), or is missing"),
    Check(id="token.issuer", link=Link.TOKEN, run=check_issuer,
          catches="iss is not https, or differs from the cluster's issuer or the provider's URL (scheme, "
                  "trailing slash, letter case, another cluster or region)"),
    Check(id="token.subject", link=Link.TOKEN, run=check_subject,
          catches="sub is not a service account, or not the ServiceAccount/pod given; a token not bound to a pod"),
)

