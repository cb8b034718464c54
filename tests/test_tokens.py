"""TokenVerifier alone: signature, algorithm, claims and key set,
against a fake clock and an in-memory key source that counts its fetches."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from daemon import config
from daemon.embedded import IRSA_AUDIENCE, Issuer
from daemon.errors import TokenError
from daemon.models import Identity, fingerprint
from daemon.tokens import TokenVerifier, parse_key_set
from tests.conftest import FakeClock, metric

LEEWAY = config.TOKEN_LEEWAY_SECONDS
REFETCH_INTERVAL = config.JWKS_REFETCH_MIN_INTERVAL_SECONDS
SUBJECT = "system:serviceaccount:team-a:app"
EC_KID = "ec-key-1"


class MemoryKeySource:
    """A key source held in memory: tests swap `document` to rotate keys, and read `fetches`."""

    description = "memory key source"

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document
        self.fetches = 0

    async def fetch(self) -> Mapping[str, Any]:
        self.fetches += 1
        return self.document


# --- minting odd tokens ---


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def claims_at(now: float, subject: str = SUBJECT, *, issuer: str, lifetime: float = 86_400, **overrides: Any) -> dict[str, Any]:
    """Projected-token claims issued at `now`; an override of None drops the claim."""
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": [IRSA_AUDIENCE],
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now + lifetime),
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": "team-a",
            "serviceaccount": {"name": "app", "uid": "sa-uid"},
            "pod": {"name": "app-1", "uid": "pod-uid-1"},
        },
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def by_hand(header: Mapping[str, Any], claims: Mapping[str, Any], sign: Callable[[bytes], bytes] | None) -> str:
    """A compact JWS assembled without PyJWT's checks: any header, any signing function (None: empty)."""
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    signature = b"" if sign is None else sign(signing_input.encode())
    return f"{signing_input}.{b64url(signature)}"


def signer(algorithm: str, key: Any) -> Callable[[bytes], bytes]:
    alg = jwt.get_algorithm_by_name(algorithm)
    return lambda message: alg.sign(message, key)


def public_pem(private_key: rsa.RSAPrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- fixtures ---


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def attacker_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str = EC_KID) -> dict[str, Any]:
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    public.update({"kid": kid, "use": "sig", "alg": "ES256"})
    return public


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keys(issuer: Issuer, ec_key: ec.EllipticCurvePrivateKey) -> MemoryKeySource:
    return MemoryKeySource({"keys": [*issuer.jwks()["keys"], ec_jwk(ec_key)]})


def new_verifier(issuer: Issuer, keys: MemoryKeySource, clock: FakeClock) -> TokenVerifier:
    return TokenVerifier(
        issuer=issuer.url,
        audience=IRSA_AUDIENCE,
        key_source=keys,
        clock=clock,
        leeway_seconds=LEEWAY,
        refetch_min_interval_seconds=REFETCH_INTERVAL,
        max_verified=1000,
    )


@pytest.fixture
async def verifier(issuer: Issuer, keys: MemoryKeySource, clock: FakeClock) -> TokenVerifier:
    verifier = new_verifier(issuer, keys, clock)
    await verifier.load_keys()
    assert keys.fetches == 1
    return verifier


def rs256(issuer: Issuer, claims: Mapping[str, Any], **headers: Any) -> str:
    return jwt.encode(dict(claims), issuer.private_key, algorithm="RS256", headers={"kid": issuer.kid, **headers})


async def refused(verifier: TokenVerifier, token: str) -> TokenError:
    with pytest.raises(TokenError) as caught:
        await verifier.verify(token)
    assert caught.value.status == 401
    return caught.value


# --- what verifies ---


async def test_a_valid_rs256_token_gives_the_identity_it_carries(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock
) -> None:
    token = issuer.mint(SUBJECT, now=clock(), pod_name="app-7", pod_uid="uid-7")

    verified = await verifier.verify(token)

    assert verified.identity == Identity(
        issuer=issuer.url,
        subject=SUBJECT,
        audience=IRSA_AUDIENCE,
        namespace="team-a",
        service_account="app",
        pod_name="app-7",
        pod_uid="uid-7",
    )
    assert verified.raw == token
    assert verified.expires_at == int(clock() + 86_400)
    assert verified.fingerprint == fingerprint(token)
    assert token not in repr(verified)


async def test_an_es256_key_and_token_verify(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    token = jwt.encode(claims_at(clock(), issuer=issuer.url), ec_key, algorithm="ES256", headers={"kid": EC_KID})

    verified = await verifier.verify(token)

    assert verified.identity.subject == SUBJECT
    assert verified.identity.pod_name == "app-1"


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"aud": IRSA_AUDIENCE}, id="aud-as-a-string"),
        pytest.param({"aud": ["vault", IRSA_AUDIENCE]}, id="aud-list-with-ours-second"),
        pytest.param({"kubernetes.io": None}, id="no-kubernetes-claims"),
        pytest.param({"nbf": None, "iat": None, "jti": None}, id="only-required-claims"),
    ],
)
async def test_claim_shapes_that_verify(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock, overrides: dict[str, Any]
) -> None:
    verified = await verifier.verify(rs256(issuer, claims_at(clock(), issuer=issuer.url, **overrides)))

    assert verified.identity.subject == SUBJECT
    assert verified.identity.audience == IRSA_AUDIENCE


async def test_a_lone_key_may_sign_without_a_kid(issuer: Issuer, clock: FakeClock) -> None:
    keys = MemoryKeySource(issuer.jwks())
    verifier = new_verifier(issuer, keys, clock)
    await verifier.load_keys()
    token = jwt.encode(claims_at(clock(), issuer=issuer.url), issuer.private_key, algorithm="RS256")

    assert (await verifier.verify(token)).identity.subject == SUBJECT


# --- algorithms: never none, never HMAC, never a header that disagrees with the key ---


def alg_none(issuer: Issuer, claims: dict[str, Any], alg: str = "none") -> str:
    return by_hand({"alg": alg, "typ": "JWT", "kid": issuer.kid}, claims, None)


def hmac_with_public_pem(issuer: Issuer, claims: dict[str, Any], alg: str = "HS256") -> str:
    """The key-confusion attack: HMAC keyed with the PEM of the issuer's public key, which anyone can fetch.
    PyJWT refuses to do this, so the token is built by hand."""
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]
    pem = public_pem(issuer.private_key)
    return by_hand(
        {"alg": alg, "typ": "JWT", "kid": issuer.kid}, claims, lambda message: hmac.new(pem, message, digest).digest()
    )


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda issuer, claims, ec_key: alg_none(issuer, claims), id="alg-none"),
        pytest.param(lambda issuer, claims, ec_key: alg_none(issuer, claims, "None"), id="alg-None"),
        pytest.param(lambda issuer, claims, ec_key: alg_none(issuer, claims, "NONE"), id="alg-NONE"),
        pytest.param(lambda issuer, claims, ec_key: alg_none(issuer, claims, ""), id="alg-empty"),
        pytest.param(
            lambda issuer, claims, ec_key: by_hand({"typ": "JWT", "kid": issuer.kid}, claims, signer("RS256", issuer.private_key)),
            id="alg-absent",
        ),
        pytest.param(
            lambda issuer, claims, ec_key: by_hand({"alg": ["RS256"], "kid": issuer.kid}, claims, signer("RS256", issuer.private_key)),
            id="alg-a-list",
        ),
        pytest.param(lambda issuer, claims, ec_key: hmac_with_public_pem(issuer, claims), id="HS256-keyed-with-public-pem"),
        pytest.param(lambda issuer, claims, ec_key: hmac_with_public_pem(issuer, claims, "HS512"), id="HS512-keyed-with-public-pem"),
        pytest.param(
            # A real RSA signature by the trusted key, but with an algorithm off the allow-list.
            lambda issuer, claims, ec_key: jwt.encode(claims, issuer.private_key, algorithm="PS256", headers={"kid": issuer.kid}),
            id="PS256-not-allowed",
        ),
        pytest.param(
            # Header says RS256, the key named is the EC key (signed with it, as ES256).
            lambda issuer, claims, ec_key: by_hand({"alg": "RS256", "kid": EC_KID}, claims, signer("ES256", ec_key)),
            id="RS256-header-EC-key",
        ),
        pytest.param(
            # Header says ES256, the key named is the RSA key (signed with it, as RS256).
            lambda issuer, claims, ec_key: by_hand({"alg": "ES256", "kid": issuer.kid}, claims, signer("RS256", issuer.private_key)),
            id="ES256-header-RSA-key",
        ),
        pytest.param(
            # Header says ES384, the EC key is P-256: a different allowed algorithm, still not this key's.
            lambda issuer, claims, ec_key: by_hand({"alg": "ES384", "kid": EC_KID}, claims, signer("ES256", ec_key)),
            id="ES384-header-P256-key",
        ),
    ],
)
async def test_algorithms_off_the_allow_list_or_off_the_key_are_refused(
    verifier: TokenVerifier,
    issuer: Issuer,
    clock: FakeClock,
    ec_key: ec.EllipticCurvePrivateKey,
    forge: Callable[..., str],
) -> None:
    before = metric("irsa_cache_token_verifications_total", result="algorithm_not_allowed")
    token = forge(issuer, claims_at(clock(), issuer=issuer.url), ec_key)

    error = await refused(verifier, token)

    assert error.code == "algorithm_not_allowed"
    assert token not in error.message
    assert metric("irsa_cache_token_verifications_total", result="algorithm_not_allowed") == before + 1


async def test_the_hmac_attack_token_is_well_formed_so_only_the_allow_list_stops_it(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock
) -> None:
    token = hmac_with_public_pem(issuer, claims_at(clock(), issuer=issuer.url))
    signing_input, signature = token.rsplit(".", 1)
    # A verifier that let the header pick the algorithm, keyed with the public key it trusts, would accept it.
    hs256 = jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256)
    assert hs256.verify(signing_input.encode(), public_pem(issuer.private_key), unb64url(signature))

    assert (await refused(verifier, token)).code == "algorithm_not_allowed"


# --- claims ---


@pytest.mark.parametrize(
    ("overrides", "code", "mentions"),
    [
        pytest.param({"iss": "https://evil.example/id/X"}, "wrong_issuer", ["https://evil.example/id/X", "{issuer}"], id="other-issuer"),
        pytest.param({"iss": "{issuer}/"}, "wrong_issuer", ["{issuer}/"], id="issuer-with-trailing-slash"),
        pytest.param({"iss": None}, "wrong_issuer", ["iss", "missing"], id="issuer-missing"),
        pytest.param({"aud": ["vault"]}, "wrong_audience", ["vault", IRSA_AUDIENCE], id="other-audience"),
        pytest.param({"aud": "sts.amazonaws.com.evil"}, "wrong_audience", [IRSA_AUDIENCE], id="audience-prefix-match"),
        pytest.param({"aud": None}, "wrong_audience", ["missing", IRSA_AUDIENCE], id="audience-missing"),
        pytest.param({"aud": []}, "wrong_audience", [IRSA_AUDIENCE], id="audience-empty-list"),
        pytest.param({"exp": None}, "expired_token", ["exp"], id="exp-missing"),
        pytest.param({"exp": "tomorrow"}, "malformed_token", ["exp"], id="exp-not-a-number"),
        pytest.param({"exp": True}, "malformed_token", ["exp"], id="exp-boolean"),
        pytest.param({"nbf": "now"}, "malformed_token", ["nbf"], id="nbf-not-a-number"),
        pytest.param({"iat": [1]}, "malformed_token", ["iat"], id="iat-not-a-number"),
        pytest.param({"exp": 10**20}, "malformed_token", ["exp"], id="exp-beyond-year-9999"),
        pytest.param({"sub": None}, "malformed_token", ["sub"], id="sub-missing"),
    ],
)
async def test_claims_that_are_refused_name_the_claim(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock, overrides: dict[str, Any], code: str, mentions: list[str]
) -> None:
    overrides = {k: v.format(issuer=issuer.url) if isinstance(v, str) else v for k, v in overrides.items()}
    token = rs256(issuer, claims_at(clock(), issuer=issuer.url, **overrides))

    error = await refused(verifier, token)

    assert error.code == code
    for text in mentions:
        assert text.format(issuer=issuer.url) in error.message


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
async def test_a_time_claim_must_be_a_finite_number(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock, claim: str, number: str
) -> None:
    # Signed by the trusted key: only the claim check stands between this token and
    # "never expires" (NaN compares false with everything; 1e400 parses as infinity).
    claims = claims_at(clock(), issuer=issuer.url)
    payload = json.dumps({**claims, claim: "@@"}, separators=(",", ":")).replace('"@@"', number)
    signing_input = f"{b64json({'alg': 'RS256', 'typ': 'JWT', 'kid': issuer.kid})}.{b64url(payload.encode())}"
    token = f"{signing_input}.{b64url(signer('RS256', issuer.private_key)(signing_input.encode()))}"

    error = await refused(verifier, token)

    assert error.code == "malformed_token"
    assert claim in error.message


async def test_wrong_issuer_message_shows_expected_and_got(verifier: TokenVerifier, issuer: Issuer, clock: FakeClock) -> None:
    token = issuer.mint(SUBJECT, now=clock(), issuer="https://oidc.other-cluster.test/id/OTHER")

    error = await refused(verifier, token)

    assert error.code == "wrong_issuer"
    assert "expected" in error.message
    assert repr(issuer.url) in error.message
    assert repr("https://oidc.other-cluster.test/id/OTHER") in error.message


@pytest.mark.parametrize(
    ("age_past_exp", "accepted"),
    [
        pytest.param(-1, True, id="one-second-before-exp"),
        pytest.param(30, True, id="30s-past-exp-within-leeway"),
        pytest.param(LEEWAY, True, id="exactly-at-leeway"),
        pytest.param(LEEWAY + 1, False, id="1s-beyond-leeway"),
        pytest.param(3600, False, id="an-hour-past-exp"),
    ],
)
async def test_expiry_is_judged_by_the_clock_with_60s_leeway(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock, age_past_exp: float, accepted: bool
) -> None:
    exp = clock() - age_past_exp
    token = rs256(issuer, claims_at(clock() - 3600, issuer=issuer.url, exp=int(exp)))

    if accepted:
        assert (await verifier.verify(token)).expires_at == int(exp)
        return
    error = await refused(verifier, token)
    assert error.code == "expired_token"
    assert datetime.fromtimestamp(int(exp), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") in error.message
    assert f"{clock() - int(exp):.0f} s ago" in error.message


@pytest.mark.parametrize(
    ("nbf_ahead", "accepted"),
    [
        pytest.param(30, True, id="30s-ahead-within-leeway"),
        pytest.param(LEEWAY, True, id="exactly-at-leeway"),
        pytest.param(LEEWAY + 1, False, id="1s-beyond-leeway"),
        pytest.param(3600, False, id="an-hour-ahead"),
    ],
)
async def test_not_before_in_the_future_beyond_leeway_is_refused(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock, nbf_ahead: float, accepted: bool
) -> None:
    nbf = int(clock() + nbf_ahead)
    token = rs256(issuer, claims_at(clock(), issuer=issuer.url, nbf=nbf))

    if accepted:
        assert (await verifier.verify(token)).identity.subject == SUBJECT
        return
    error = await refused(verifier, token)
    assert error.code == "token_not_yet_valid"
    assert datetime.fromtimestamp(nbf, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") in error.message


@pytest.mark.parametrize(
    "kubernetes",
    [
        pytest.param("team-a", id="claim-a-string"),
        pytest.param({"namespace": "team-a", "pod": "app-1"}, id="pod-a-string"),
        pytest.param({"namespace": "team-a", "serviceaccount": ["app"]}, id="serviceaccount-a-list"),
    ],
)
async def test_odd_kubernetes_claims_from_the_trusted_issuer_are_a_token_error_not_a_crash(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock, kubernetes: Any
) -> None:
    token = rs256(issuer, claims_at(clock(), issuer=issuer.url, **{"kubernetes.io": kubernetes}))

    assert (await refused(verifier, token)).code == "malformed_token"


# --- signatures and garbage ---


def flip_char(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1:]


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(
            lambda token, issuer, attacker: ".".join(
                [token.split(".")[0], b64json({**jwt.decode(token, options={"verify_signature": False}),
                                               "sub": "system:serviceaccount:kube-system:admin"}), token.split(".")[2]]
            ),
            id="payload-rewritten-new-subject",
        ),
        pytest.param(
            lambda token, issuer, attacker: ".".join(
                [token.split(".")[0], b64json({**jwt.decode(token, options={"verify_signature": False}),
                                               "exp": 4_000_000_000}), token.split(".")[2]]
            ),
            id="payload-rewritten-later-exp",
        ),
        pytest.param(
            lambda token, issuer, attacker: flip_char(token, len(token) - 100), id="signature-byte-changed"
        ),
        pytest.param(
            lambda token, issuer, attacker: token.rsplit(".", 1)[0] + "." + b64url(unb64url(token.rsplit(".", 1)[1])[:-30]),
            id="signature-truncated",
        ),
        pytest.param(
            lambda token, issuer, attacker: jwt.encode(
                jwt.decode(token, options={"verify_signature": False}), attacker, algorithm="RS256",
                headers={"kid": issuer.kid},
            ),
            id="signed-by-another-key-under-our-kid",
        ),
        pytest.param(
            # The attacker ships its own public key in the header (RFC 7515 `jwk`, `jku`): never used.
            lambda token, issuer, attacker: jwt.encode(
                jwt.decode(token, options={"verify_signature": False}), attacker, algorithm="RS256",
                headers={"kid": issuer.kid, "jku": "https://evil.example/jwks",
                         "jwk": json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(attacker.public_key()))},
            ),
            id="attacker-key-embedded-in-header",
        ),
    ],
)
async def test_a_tampered_token_fails_its_signature(
    verifier: TokenVerifier,
    issuer: Issuer,
    clock: FakeClock,
    attacker_rsa: rsa.RSAPrivateKey,
    tamper: Callable[[str, Issuer, rsa.RSAPrivateKey], str],
) -> None:
    token = tamper(issuer.mint(SUBJECT, now=clock()), issuer, attacker_rsa)

    error = await refused(verifier, token)

    assert error.code == "bad_signature"
    assert repr(issuer.kid) in error.message


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("garbage", id="word"),
        pytest.param("", id="empty"),
        pytest.param("a.b.c", id="three-junk-segments"),
        pytest.param("....", id="only-dots"),
        pytest.param("Bearer " + "x" * 40, id="bearer-junk"),
        pytest.param(b64json(["RS256"]) + ".e30.", id="header-a-json-list"),
        pytest.param("%%%." + b64json({}) + ".", id="header-not-base64"),
        pytest.param(b64url(b"\xff\xfe") + ".e30.", id="header-not-utf8"),
        pytest.param(b64json({"alg": "RS256", "kid": ["k"]}) + ".e30.sig", id="kid-a-list"),
        pytest.param(b64json({"alg": "RS256", "kid": {"a": 1}}) + ".e30.sig", id="kid-an-object"),
    ],
)
async def test_garbage_is_a_malformed_token(verifier: TokenVerifier, token: str) -> None:
    error = await refused(verifier, token)

    assert error.code == "malformed_token"


async def test_a_validly_signed_payload_that_is_not_json_is_malformed(
    verifier: TokenVerifier, issuer: Issuer
) -> None:
    header = b64json({"alg": "RS256", "kid": issuer.kid})
    signing_input = f"{header}.{b64url(b'not json')}"
    token = f"{signing_input}.{b64url(signer('RS256', issuer.private_key)(signing_input.encode()))}"

    assert (await refused(verifier, token)).code == "malformed_token"


# --- key set: unknown kid, rotation, flood ---


async def test_an_unknown_kid_costs_exactly_one_refetch(
    verifier: TokenVerifier, issuer: Issuer, keys: MemoryKeySource, clock: FakeClock, attacker_rsa: rsa.RSAPrivateKey
) -> None:
    clock.advance(REFETCH_INTERVAL + 1)  # the initial load counts as the last fetch
    fetched = metric("irsa_cache_key_set_fetches_total")
    token = jwt.encode(claims_at(clock(), issuer=issuer.url), attacker_rsa, algorithm="RS256", headers={"kid": "stranger"})

    error = await refused(verifier, token)

    assert error.code == "unknown_key"
    assert "'stranger'" in error.message
    assert keys.fetches == 2
    assert metric("irsa_cache_key_set_fetches_total") == fetched + 1
    # Asked again at once: still unknown, and no second fetch.
    assert (await refused(verifier, token)).code == "unknown_key"
    assert keys.fetches == 2


async def test_a_rotated_in_key_is_trusted_after_one_refetch(
    verifier: TokenVerifier, issuer: Issuer, keys: MemoryKeySource, clock: FakeClock
) -> None:
    rotated = Issuer(url=issuer.url)  # same issuer, a new signing key and kid
    keys.document = {"keys": [*issuer.jwks()["keys"], *rotated.jwks()["keys"]]}
    clock.advance(REFETCH_INTERVAL + 1)

    verified = await verifier.verify(rotated.mint(SUBJECT, now=clock()))

    assert verified.identity.subject == SUBJECT
    assert keys.fetches == 2
    # Further tokens of the new key and of the old one need no fetch.
    await verifier.verify(rotated.mint(SUBJECT, now=clock(), pod_name="app-2"))
    await verifier.verify(issuer.mint(SUBJECT, now=clock(), pod_name="app-3"))
    assert keys.fetches == 2


async def test_a_key_rotated_out_is_no_longer_trusted_for_new_tokens(
    verifier: TokenVerifier, issuer: Issuer, keys: MemoryKeySource, clock: FakeClock
) -> None:
    rotated = Issuer(url=issuer.url)
    keys.document = rotated.jwks()  # the old key is gone
    clock.advance(REFETCH_INTERVAL + 1)
    await verifier.verify(rotated.mint(SUBJECT, now=clock()))  # triggers the refetch

    error = await refused(verifier, issuer.mint(SUBJECT, now=clock()))

    assert error.code == "unknown_key"
    assert keys.fetches == 2


async def test_a_rotation_within_the_refetch_interval_waits_for_the_interval(
    verifier: TokenVerifier, issuer: Issuer, keys: MemoryKeySource, clock: FakeClock
) -> None:
    clock.advance(REFETCH_INTERVAL + 1)
    await refused(verifier, jwt.encode(claims_at(clock(), issuer=issuer.url), issuer.private_key,
                                       algorithm="RS256", headers={"kid": "not-yet"}))
    assert keys.fetches == 2
    rotated = Issuer(url=issuer.url)
    keys.document = {"keys": [*issuer.jwks()["keys"], *rotated.jwks()["keys"]]}
    token = rotated.mint(SUBJECT, now=clock())

    clock.advance(REFETCH_INTERVAL - 1)
    assert (await refused(verifier, token)).code == "unknown_key"
    assert keys.fetches == 2
    clock.advance(2)
    assert (await verifier.verify(token)).identity.subject == SUBJECT
    assert keys.fetches == 3


async def test_a_flood_of_unknown_kids_costs_one_refetch_per_interval(
    verifier: TokenVerifier, issuer: Issuer, keys: MemoryKeySource, clock: FakeClock, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    rng = random.Random(1234)
    attacker = ec.generate_private_key(ec.SECP256R1())

    def bogus() -> str:
        kid = f"{rng.getrandbits(64):016x}"
        return jwt.encode(claims_at(clock(), issuer=issuer.url), attacker, algorithm="ES256", headers={"kid": kid})

    clock.advance(REFETCH_INTERVAL + 1)
    fetched = metric("irsa_cache_key_set_fetches_total")
    results = await asyncio.wait_for(
        asyncio.gather(*(verifier.verify(bogus()) for _ in range(1000)), return_exceptions=True), timeout=30
    )

    assert all(isinstance(r, TokenError) and r.code == "unknown_key" for r in results)
    assert keys.fetches == 2  # the load, and one refetch for all thousand
    assert metric("irsa_cache_key_set_fetches_total") == fetched + 1

    clock.advance(REFETCH_INTERVAL / 2)  # still within the interval of that refetch
    for _ in range(100):
        assert (await refused(verifier, bogus())).code == "unknown_key"
    assert keys.fetches == 2

    clock.advance(REFETCH_INTERVAL / 2 + 1)  # past it: one more, and only one
    results = await asyncio.gather(*(verifier.verify(bogus()) for _ in range(200)), return_exceptions=True)
    assert all(isinstance(r, TokenError) and r.code == "unknown_key" for r in results)
    assert keys.fetches == 3
    # The real keys survived the flood.
    assert (await verifier.verify(issuer.mint(SUBJECT, now=clock()))).identity.subject == SUBJECT


async def test_a_failing_refetch_keeps_the_keys_we_have(
    verifier: TokenVerifier, issuer: Issuer, keys: MemoryKeySource, clock: FakeClock
) -> None:
    async def broken() -> Mapping[str, Any]:
        keys.fetches += 1
        raise OSError("key source unreachable")

    keys.fetch = broken  # type: ignore[method-assign]
    clock.advance(REFETCH_INTERVAL + 1)
    bogus = jwt.encode(claims_at(clock(), issuer=issuer.url), issuer.private_key, algorithm="RS256", headers={"kid": "gone"})

    assert (await refused(verifier, bogus)).code == "unknown_key"
    assert keys.fetches == 2
    assert (await verifier.verify(issuer.mint(SUBJECT, now=clock()))).identity.subject == SUBJECT


# --- the verification cache ---


async def test_a_verified_token_is_served_from_cache_until_exp_plus_leeway(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock
) -> None:
    token = issuer.mint(SUBJECT, now=clock(), lifetime_seconds=600)
    valid = metric("irsa_cache_token_verifications_total", result="valid")
    cached = metric("irsa_cache_token_verifications_total", result="cached")

    first = await verifier.verify(token)
    second = await verifier.verify(token)

    assert second == first
    assert metric("irsa_cache_token_verifications_total", result="valid") == valid + 1
    assert metric("irsa_cache_token_verifications_total", result="cached") == cached + 1

    clock.advance(600 + LEEWAY)  # exactly at exp + leeway: still good
    assert await verifier.verify(token) == first
    assert metric("irsa_cache_token_verifications_total", result="cached") == cached + 2

    clock.advance(1)  # beyond it: the cached result is refused
    error = await refused(verifier, token)
    assert error.code == "expired_token"
    assert metric("irsa_cache_token_verifications_total", result="cached") == cached + 2
    # And it stays refused (not resurrected from the cache).
    assert (await refused(verifier, token)).code == "expired_token"


async def test_a_refused_token_is_not_cached(verifier: TokenVerifier, issuer: Issuer, clock: FakeClock) -> None:
    token = rs256(issuer, claims_at(clock(), issuer=issuer.url, nbf=int(clock() + 600)))
    assert (await refused(verifier, token)).code == "token_not_yet_valid"

    clock.advance(600)

    assert (await verifier.verify(token)).identity.subject == SUBJECT


async def test_the_verification_cache_keeps_what_a_token_proved_not_the_token(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock
) -> None:
    # The raw token lives only with the cache entry that may refresh with it.
    token = issuer.mint(SUBJECT, now=clock())
    first = await verifier.verify(token)
    again = await verifier.verify(token)

    assert again.raw == token and again.identity == first.identity
    remembered = repr(list(verifier._verified.values()))
    assert SUBJECT in remembered and token not in remembered and token.split(".")[2] not in remembered


async def test_the_cache_is_keyed_by_the_whole_token(verifier: TokenVerifier, issuer: Issuer, clock: FakeClock) -> None:
    token = issuer.mint(SUBJECT, now=clock())
    await verifier.verify(token)
    header, payload, signature = token.split(".")
    forged = f"{header}.{b64json({**jwt.decode(token, options={'verify_signature': False}), 'sub': 'system:serviceaccount:x:y'})}.{signature}"

    assert (await refused(verifier, forged)).code == "bad_signature"


# --- the key set document ---


def oct_jwk(secret: bytes, kid: str = "hmac") -> dict[str, Any]:
    return {"kty": "oct", "k": b64url(secret), "kid": kid, "alg": "HS256", "use": "sig"}


@pytest.mark.parametrize(
    ("extra_keys", "kept"),
    [
        pytest.param([oct_jwk(b"shared-secret")], set(), id="oct-HS256-key"),
        pytest.param([{"kty": "oct", "k": b64url(b"s"), "kid": "no-alg"}], set(), id="oct-key-without-alg"),
        pytest.param([{**oct_jwk(b"x"), "kty": "OCT"}], set(), id="oct-upper-case"),
        pytest.param(["ENC"], set(), id="encryption-key"),
        pytest.param(["PS256"], set(), id="rsa-key-marked-PS256"),
        pytest.param([{"kty": "RSA", "kid": "broken", "n": "AQAB"}], set(), id="rsa-key-missing-e"),
        pytest.param([{"kty": "nope", "kid": "alien"}], set(), id="unknown-key-type"),
        pytest.param(["EC"], {EC_KID}, id="ec-key-kept"),
    ],
)
async def test_the_key_set_keeps_only_asymmetric_signing_keys(
    issuer: Issuer, ec_key: ec.EllipticCurvePrivateKey, extra_keys: list[Any], kept: set[str]
) -> None:
    rsa_jwk = issuer.jwks()["keys"][0]
    named = {
        "ENC": {**rsa_jwk, "kid": "enc", "use": "enc"},
        "PS256": {**rsa_jwk, "kid": "pss", "alg": "PS256"},
        "EC": ec_jwk(ec_key),
    }
    document = {"keys": [rsa_jwk, *(named.get(k, k) if isinstance(k, str) else k for k in extra_keys)]}

    keys = parse_key_set(document)

    assert set(keys) == {issuer.kid} | kept


def rsa_jwk_of_bits(bits: int, kid: str) -> dict[str, Any]:
    # cryptography no longer generates keys under 1024 bits; a public key needs only n and e.
    n = random.Random(bits).getrandbits(bits) | (1 << (bits - 1)) | 1
    public = rsa.RSAPublicNumbers(65537, n).public_key()
    return {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public)), "kid": kid, "use": "sig", "alg": "RS256"}


def ec_jwk_on(curve: ec.EllipticCurve, alg: str | None, kid: str) -> dict[str, Any]:
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(curve).public_key()))
    return {**public, "kid": kid, **({"alg": alg} if alg else {})}


@pytest.mark.parametrize(
    ("jwk", "kept"),
    [
        pytest.param(lambda: rsa_jwk_of_bits(512, "rsa-512"), False, id="rsa-512"),
        pytest.param(lambda: rsa_jwk_of_bits(1024, "rsa-1024"), False, id="rsa-1024"),
        pytest.param(lambda: rsa_jwk_of_bits(2047, "rsa-2047"), False, id="rsa-2047"),
        pytest.param(lambda: rsa_jwk_of_bits(2048, "rsa-2048"), True, id="rsa-2048"),
        pytest.param(lambda: rsa_jwk_of_bits(4096, "rsa-4096"), True, id="rsa-4096"),
        pytest.param(lambda: ec_jwk_on(ec.SECP256R1(), "ES384", "p256-as-es384"), False, id="p256-claiming-ES384"),
        pytest.param(lambda: ec_jwk_on(ec.SECP384R1(), "ES256", "p384-as-es256"), False, id="p384-claiming-ES256"),
        pytest.param(lambda: ec_jwk_on(ec.SECP256K1(), None, "secp256k1"), False, id="secp256k1"),
        pytest.param(lambda: ec_jwk_on(ec.SECP384R1(), "ES384", "p384"), True, id="p384-ES384"),
        pytest.param(lambda: ec_jwk_on(ec.SECP521R1(), None, "p521"), True, id="p521-by-curve"),
    ],
)
def test_weak_keys_and_keys_off_their_curve_are_skipped_at_load(
    jwk: Callable[[], dict[str, Any]], kept: bool, caplog: pytest.LogCaptureFixture
) -> None:
    key = jwk()

    keys = parse_key_set({"keys": [key]})

    assert (key["kid"] in keys) is kept
    if not kept:
        assert f"skipping key {key['kid']}" in caplog.text


@pytest.mark.parametrize(
    "document",
    [
        pytest.param([], id="a-list"),
        pytest.param({"keys": {"kid": "x"}}, id="keys-not-a-list"),
        pytest.param("keys", id="a-string"),
        pytest.param({}, id="no-keys"),
    ],
)
def test_a_document_that_is_not_a_key_set_is_a_clear_error(document: Any) -> None:
    with pytest.raises(ValueError, match="not a JSON Web Key Set"):
        parse_key_set(document)


def test_entries_that_are_not_objects_are_skipped(issuer: Issuer) -> None:
    keys = parse_key_set({"keys": ["junk", 7, None, *issuer.jwks()["keys"]]})

    assert set(keys) == {issuer.kid}


async def test_an_hmac_key_in_the_key_set_never_verifies_a_token(issuer: Issuer, clock: FakeClock) -> None:
    secret = b"the-shared-secret-the-attacker-also-knows"
    keys = MemoryKeySource({"keys": [*issuer.jwks()["keys"], oct_jwk(secret)]})
    verifier = new_verifier(issuer, keys, clock)
    await verifier.load_keys()
    token = jwt.encode(claims_at(clock(), issuer=issuer.url), secret, algorithm="HS256", headers={"kid": "hmac"})

    assert (await refused(verifier, token)).code == "algorithm_not_allowed"


async def test_a_key_set_with_only_hmac_keys_is_refused_at_load(issuer: Issuer, clock: FakeClock) -> None:
    verifier = new_verifier(issuer, MemoryKeySource({"keys": [oct_jwk(b"secret")]}), clock)

    with pytest.raises(ValueError, match="no usable signing key"):
        await verifier.load_keys()
    assert not verifier.ready


async def test_verified_before_answers_only_what_verify_proved_and_only_until_exp_plus_leeway(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock
) -> None:
    token = issuer.mint(SUBJECT, now=clock(), lifetime_seconds=600)
    assert verifier.verified_before(token) is None  # never verified: the caller must verify
    first = await verifier.verify(token)
    cached = metric("irsa_cache_token_verifications_total", result="cached")

    assert verifier.verified_before(token) == first
    assert verifier.verified_before(flip_char(token, len(token) - 10)) is None  # another token, however close
    # Not counted here: the server counts the answers it uses (tests/test_shortcut.py).
    assert metric("irsa_cache_token_verifications_total", result="cached") == cached

    clock.advance(600 + LEEWAY + 1)
    assert verifier.verified_before(token) is None
    assert (await refused(verifier, token)).code == "expired_token"
