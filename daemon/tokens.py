"""Token verification: from a raw projected service-account token to an Identity.

The token is read by `jws.py` (strict compact form, header parsed, payload not yet);
its algorithm must be on the allow-list and be the named key's own, and the
signature is verified with that key's PyJWT algorithm object (cryptography
underneath). Only then is the payload parsed, and the claims are checked here
against the injected clock, so that each failure names its claim and tests can move
time. Keys come from the key set through PyJWT, which refuses what we never trust
(HMAC, weak RSA, EC keys off their curve: see `parse_key_set`). Results are kept per
token digest: the hot path does no RSA work for a token it has already seen, yet
expiry is checked on every use.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from daemon import jws, metrics
from daemon.backoff import full_jitter
from daemon.errors import DirectoryUnavailableError, TokenError
from daemon.logs import describe
from daemon.bounded import make_room
from daemon.models import Clock, Identity, VerifiedToken, digest_fingerprint

log = logging.getLogger(__name__)
_RNG = random.Random()  # the key loader's backoff jitter

# Asymmetric only: never `none`, never HMAC (an HMAC "signed" with our public key
# would otherwise verify).
ALLOWED_ALGORITHMS = ("RS256", "ES256", "ES384", "ES512")


class _Proof(NamedTuple):
    identity: Identity
    expires_at: float
    fingerprint: str


class KeySource(Protocol):
    """Where the issuer's JSON Web Key Set comes from."""

    description: str

    async def fetch(self) -> Mapping[str, Any]: ...


class FileKeySource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"file {path}"

    async def fetch(self) -> Mapping[str, Any]:
        with self.path.open("rb") as file:
            body = file.read(MAX_KEY_SET_BYTES + 1)
        return _json_document(body, self.description)


class UrlKeySource:
    def __init__(self, url: str, *, timeout_seconds: float = 5.0) -> None:
        self.url = url
        self.description = f"URL {url}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def fetch(self) -> Mapping[str, Any]:
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            async with session.get(self.url) as response:
                if response.status != 200:
                    raise ValueError(f"{self.url} answered HTTP {response.status}")
                return _json_document(await response.content.read(MAX_KEY_SET_BYTES + 1), self.description)


def _json_document(body: bytes, where: str) -> Mapping[str, Any]:
    if len(body) > MAX_KEY_SET_BYTES:
        raise ValueError(f"{where} holds more than {MAX_KEY_SET_BYTES} bytes: not a key set")
    try:
        document = json.loads(body)
    except ValueError:
        raise ValueError(f"{where} is not JSON") from None
    if not isinstance(document, dict):
        raise ValueError(f"{where} is not a JSON object")
    return document


KEY_LOAD_BACKOFF_BASE_SECONDS = 0.5
KEY_LOAD_BACKOFF_MAX_SECONDS = 30.0
MIN_RSA_KEY_BITS = 2048  # NIST SP 800-57: smaller RSA keys are breakable
# The one curve each ECDSA algorithm is defined on (RFC 7518, section 3.4).
CURVE_OF_ALGORITHM = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
MAX_KEY_SET_BYTES = 1024 * 1024  # a key set holds a few keys; anything larger is not one


def parse_key_set(document: Any, skipped: list[str] | None = None) -> dict[str | None, jwt.PyJWK]:
    """Keys by `kid`. Keys we would never trust are skipped: HMAC and encryption keys,
    unknown types, RSA keys under 2048 bits, EC keys on a curve other than their
    algorithm's; each reason is logged, or added to `skipped` if given. Raises ValueError
    for a document that is not a key set."""
    def skip(reason: str, *args: Any) -> None:
        if skipped is None:
            log.warning(reason, *args)
        else:
            skipped.append(reason % args)

    raw_keys = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(raw_keys, list):
        raise ValueError("not a JSON Web Key Set (no `keys` list)")
    keys: dict[str | None, jwt.PyJWK] = {}
    for raw in raw_keys:
        if not isinstance(raw, dict):
            skip("skipping a key set entry that is not an object")
            continue
        kid = raw.get("kid")
        if raw.get("kty") == "oct" or raw.get("use", "sig") != "sig":
            skip("skipping key %s: not an asymmetric signing key", kid)
            continue
        try:
            key = jwt.PyJWK(raw)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            skip("skipping key %s: %s", kid, exc)
            continue
        if key.algorithm_name not in ALLOWED_ALGORITHMS:
            skip("skipping key %s: algorithm %s is not allowed", kid, key.algorithm_name)
            continue
        weakness = _weakness(key)
        if weakness:
            skip("skipping key %s: %s", kid, weakness)
            continue
        keys[kid if isinstance(kid, str) else None] = key
    return keys


def _weakness(key: jwt.PyJWK) -> str | None:
    public = key.key
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_KEY_BITS:
        return f"an RSA key of {public.key_size} bits (at least {MIN_RSA_KEY_BITS} are required)"
    if isinstance(public, ec.EllipticCurvePublicKey):
        wanted = CURVE_OF_ALGORITHM.get(key.algorithm_name)
        if public.curve.name != wanted:
            return f"an EC key on {public.curve.name}, but {key.algorithm_name} is defined on {wanted}"
    if not isinstance(public, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        return "not a public key"  # a JWK carrying private parameters, say
    return None


async def retry_until_done(attempt: Callable[[], Awaitable[None]], *, on_failure: Callable[[str], None],
                           max_delay_seconds: float = KEY_LOAD_BACKOFF_MAX_SECONDS) -> None:
    """Run `attempt` until it returns, backing off with full jitter after each failure
    (told to `on_failure` as one line, and logged)."""
    failures = 0
    while True:
        try:
            await attempt()
            return
        except Exception as exc:  # noqa: BLE001 - an upstream's failure, whatever its kind
            failures += 1
            reason = describe(exc)
            on_failure(reason)
            delay = full_jitter(_RNG, KEY_LOAD_BACKOFF_BASE_SECONDS, max_delay_seconds, failures)
            log.warning("%s; retrying in %.1f s", reason, delay)
            await asyncio.sleep(delay)


class TokenVerifier:
    """Verifies tokens of one issuer and audience against a trusted key set.

    `issuer` may be None with `discover_issuer` given: the issuer is then asked for
    when the keys are first loaded (a cluster's discovery document)."""

    def __init__(
        self,
        *,
        issuer: str | None,
        audience: str,
        key_source: KeySource,
        clock: Clock,
        leeway_seconds: float,
        refetch_min_interval_seconds: float,
        max_verified: int,
        discover_issuer: Callable[[], Awaitable[str]] | None = None,
        retry_max_seconds: float = KEY_LOAD_BACKOFF_MAX_SECONDS,
    ) -> None:
        if issuer is None and discover_issuer is None:
            raise ValueError("TokenVerifier needs an issuer or a way to discover it")
        self.issuer = issuer
        self._discover_issuer = discover_issuer
        self._retry_max_seconds = retry_max_seconds
        self.audience = audience
        self._key_source = key_source
        self._clock = clock
        self._leeway = leeway_seconds
        self._refetch_min_interval = refetch_min_interval_seconds
        self._max_verified = max_verified
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._last_fetch: float | None = None
        self._fetch_lock = asyncio.Lock()
        self._load_error: str | None = None
        # What a token proved, by digest: never the token itself, which stays only with
        # the cache entry that may need it to refresh.
        self._verified: dict[bytes, _Proof] = {}
        self._cached_count = metrics.token_verification("cached")

    @property
    def ready(self) -> bool:
        return bool(self._keys) and self.issuer is not None

    @property
    def not_ready_reason(self) -> str | None:
        """Why no token can be verified yet, for /readyz; None once the keys are loaded."""
        if self.ready:
            return None
        return self._load_error or f"signing keys not loaded yet from {self._key_source.description}"

    async def load_keys(self, skipped: list[str] | None = None) -> None:
        """Fetch the key set now; raises if the source fails or holds no usable key. Keys
        skipped are logged, or added to `skipped` if given (doctor shows them its own way)."""
        if self.issuer is None:
            assert self._discover_issuer is not None  # the constructor insists on one of them
            self.issuer = await self._discover_issuer()
            log.info("service-account issuer: %s", self.issuer)
        document = await self._key_source.fetch()
        reasons: list[str] = []
        keys = parse_key_set(document, reasons)
        if not keys:
            why = f" ({'; '.join(reasons)})" if reasons else ""
            raise ValueError(f"the key set from {self._key_source.description} has no usable signing key{why}")
        if skipped is not None:
            skipped.extend(reasons)
        else:
            for reason in reasons:
                log.warning("%s", reason)
        self._keys = keys
        self._load_error = None
        # Debug: a bad configuration found after this must be the only line a user sees.
        log.debug("loaded %d signing keys from %s", len(keys), self._key_source.description)

    async def run(self) -> None:
        """Load the key set (and discover the issuer, if asked to), retrying until it
        loads. An unreachable key source at start is an outage to wait out, not a reason
        to exit: every node would crash-loop through it. Once loaded, an unknown `kid`
        refetches the set (see `verify`)."""

        def failed(reason: str) -> None:
            metrics.KEY_SET_FAILURES.inc()
            self._load_error = f"signing keys not loaded from {self._key_source.description}: {reason}"

        await retry_until_done(self.load_keys, on_failure=failed, max_delay_seconds=self._retry_max_seconds)

    def verified_before(self, token: str) -> VerifiedToken | None:
        """What `token` proved when it was verified, if it still holds (its expiry, with the
        leeway, is not past): `verify`'s answer without a coroutine, for the hot path. None
        means nothing is known: call `verify`. Not counted: the caller counts the answer it uses."""
        return self._known(hashlib.sha256(token.encode()).digest(), token)

    def _known(self, digest: bytes, token: str) -> VerifiedToken | None:
        proof = self._verified.get(digest)
        if proof is None or self._clock() > proof.expires_at + self._leeway:
            return None
        return VerifiedToken(identity=proof.identity, raw=token, expires_at=proof.expires_at,
                             fingerprint=proof.fingerprint)

    async def verify(self, token: str) -> VerifiedToken:
        if not token.isascii():
            metrics.token_verification("malformed_token").inc()
            raise TokenError("the token holds characters that are not ASCII: not a JWT", code="malformed_token")
        digest = hashlib.sha256(token.encode()).digest()
        known = self._known(digest, token)
        if known is not None:
            self._cached_count.inc()
            return known
        if not self.ready:
            raise DirectoryUnavailableError(
                f"cannot verify tokens yet: {self.not_ready_reason}; retry shortly", code="keys_unavailable"
            )
        now = self._clock()
        self._verified.pop(digest, None)  # known but expired, if at all: forgotten
        try:
            verified = await self._verify_uncached(token, now, digest)
        except TokenError as exc:
            metrics.token_verification(exc.code).inc()
            raise
        metrics.token_verification("valid").inc()
        self._remember(digest, verified, now)
        return verified

    async def _verify_uncached(self, token: str, now: float, digest: bytes) -> VerifiedToken:
        try:
            compact = jws.parse(token)
        except jws.MalformedError as exc:
            raise TokenError(f"the token is not a JWT: {exc}", code="malformed_token") from None
        header = compact.header
        kid = header.get("kid")
        if "kid" in header and not isinstance(kid, str):
            raise TokenError("the token is not a JWT: its header's kid is not a string", code="malformed_token")
        if "crit" in header:  # extensions the verifier must understand (RFC 7515, 4.1.11): we know none
            raise TokenError("the token's header names critical extensions; none is supported here",
                             code="malformed_token")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise TokenError(
                f"token algorithm {alg!r} is not allowed; expected one of {', '.join(ALLOWED_ALGORITHMS)}",
                code="algorithm_not_allowed",
            )
        key = await self._key_for(kid)
        if key.algorithm_name != alg:
            raise TokenError(
                f"token says alg {alg} but key {kid!r} is a {key.algorithm_name} key",
                code="algorithm_not_allowed",
            )
        # The key's own algorithm object (RSASSA-PKCS1-v1_5 or ECDSA, with its hash), never
        # one the header chose: the header only had to agree with the key.
        if not key.Algorithm.verify(compact.signing_input, key.key, compact.signature):
            raise TokenError(
                f"the token's signature does not verify with trusted key {kid!r}", code="bad_signature"
            )
        try:
            claims = jws.payload(compact)
        except jws.MalformedError as exc:
            raise TokenError(f"the token cannot be decoded: {exc}", code="malformed_token") from None
        return self._check_claims(claims, token, now, digest_fingerprint(digest))

    async def _key_for(self, kid: str | None) -> jwt.PyJWK:
        key = self._keys.get(kid)
        if key is None and kid is None and len(self._keys) == 1:
            key = next(iter(self._keys.values()))  # a lone key may be used without a kid
        if key is None and await self._refetch_keys():
            key = self._keys.get(kid)
        if key is None:
            known = ", ".join(sorted(repr(k) for k in self._keys)) or "none"
            raise TokenError(
                f"no trusted signing key has kid {kid!r} (known: {known})", code="unknown_key"
            )
        return key

    async def _refetch_keys(self) -> bool:
        """Refetch on an unknown kid, at most once per interval: a flood of bogus kids costs one fetch."""
        async with self._fetch_lock:
            now = self._clock()
            if self._last_fetch is not None and now - self._last_fetch < self._refetch_min_interval:
                return False
            self._last_fetch = now
            metrics.KEY_SET_FETCHES.inc()
            try:
                keys = parse_key_set(await self._key_source.fetch())
            except Exception as exc:  # keep the keys we have; the next interval tries again
                metrics.KEY_SET_FAILURES.inc()
                log.warning("refetching signing keys from %s failed: %s", self._key_source.description, describe(exc))
                return False
            if keys:
                self._keys = keys
            return True

    def _check_claims(self, claims: Mapping[str, Any], token: str, now: float, token_fingerprint: str) -> VerifiedToken:
        iss = claims.get("iss")
        if iss is None:
            raise TokenError("claim 'iss' is missing", code="wrong_issuer")
        if iss != self.issuer:
            raise TokenError(f"claim 'iss' is {iss!r}, expected {self.issuer!r}", code="wrong_issuer")

        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else None
        if not audiences:
            raise TokenError(f"claim 'aud' is missing; expected {self.audience!r}", code="wrong_audience")
        if self.audience not in audiences:
            raise TokenError(
                f"claim 'aud' is {audiences!r}, which does not include {self.audience!r}",
                code="wrong_audience",
            )

        exp = _time_claim(claims, "exp")
        if exp is None:
            raise TokenError("claim 'exp' is missing", code="expired_token")
        if now > exp + self._leeway:
            raise TokenError(
                f"the token expired at {_utc(exp)} ({now - exp:.0f} s ago)", code="expired_token"
            )
        nbf = _time_claim(claims, "nbf")
        if nbf is not None and now + self._leeway < nbf:
            raise TokenError(f"the token is not valid before {_utc(nbf)}", code="token_not_yet_valid")
        _time_claim(claims, "iat")

        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise TokenError("claim 'sub' is missing", code="malformed_token")

        k8s = _object_claim(claims, "kubernetes.io")
        pod = _object_claim(k8s, "pod", "kubernetes.io.pod")
        service_account = _object_claim(k8s, "serviceaccount", "kubernetes.io.serviceaccount")
        identity = Identity(
            issuer=self.issuer,  # equal to `iss`; one string for every cached identity, not one per token
            subject=sub,
            audience=self.audience,
            namespace=_string_claim(k8s, "namespace", "kubernetes.io.namespace"),
            service_account=_string_claim(service_account, "name", "kubernetes.io.serviceaccount.name"),
            pod_name=_string_claim(pod, "name", "kubernetes.io.pod.name"),
            pod_uid=_string_claim(pod, "uid", "kubernetes.io.pod.uid"),
        )
        return VerifiedToken(identity=identity, raw=token, expires_at=float(exp), fingerprint=token_fingerprint)

    def _remember(self, digest: bytes, verified: VerifiedToken, now: float) -> None:
        make_room(self._verified, self._max_verified, lambda proof: proof.expires_at + self._leeway < now)
        self._verified[digest] = _Proof(verified.identity, verified.expires_at, verified.fingerprint)


MAX_TIME_CLAIM = 253_402_300_799  # 9999-12-31T23:59:59Z: later is no date anyone issues


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519): a finite number of seconds, or absent. NaN, an
    infinity (JSON's 1e400) or a boolean would compare as "never expires"."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= MAX_TIME_CLAIM:
        raise TokenError(f"claim {name!r} is {value!r}, not a time in seconds", code="malformed_token")
    return float(value)


def _object_claim(claims: Mapping[str, Any], name: str, path: str | None = None) -> Mapping[str, Any]:
    value = claims.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TokenError(f"claim {path or name!r} is not an object", code="malformed_token")
    return value


def _string_claim(claims: Mapping[str, Any], name: str, path: str) -> str | None:
    value = claims.get(name)
    if value is not None and not isinstance(value, str):
        raise TokenError(f"claim {path!r} is not a string", code="malformed_token")
    return value


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
