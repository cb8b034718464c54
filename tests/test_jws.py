"""The compact JWS reader (daemon/jws.py), alone and through TokenVerifier, against hostile tokens.

Its strictness is measured against PyJWT's own reader on the same inputs: every
segment PyJWT accepts without padding, the reader accepts and decodes to the same
bytes, and every segment PyJWT refuses, the reader refuses too.
"""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import jwt
import pytest
from jwt.api_jws import PyJWS

from daemon import jws
from daemon.embedded import Issuer
from daemon.tokens import TokenVerifier
from tests.conftest import FakeClock, metric
from tests.test_tokens import (  # noqa: F401 - fixtures
    b64json,
    b64url,
    claims_at,
    clock,
    ec_key,
    keys,
    refused,
    signer,
    verifier,
)

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def signed(issuer: Issuer, header: dict[str, Any], payload: bytes) -> str:
    """A token signed by the trusted key over any header and any payload bytes."""
    signing_input = f"{b64json(header)}.{b64url(payload)}"
    return f"{signing_input}.{b64url(signer('RS256', issuer.private_key)(signing_input.encode()))}"


def with_last_char_bumped(segment: str) -> str:
    """The same bytes spelled differently: the last character's unused bits set."""
    value = ALPHABET.index(segment[-1])
    assert value & {2: 0b1111, 3: 0b11}[len(segment) % 4] == 0
    return segment[:-1] + ALPHABET[value + 1]


# --- the reader alone ---


def test_a_minted_token_splits_into_header_signing_input_and_signature(issuer: Issuer) -> None:
    token = issuer.mint("system:serviceaccount:a:b")
    header, payload, signature = token.split(".")

    compact = jws.parse(token)

    assert compact.header == {"alg": "RS256", "kid": issuer.kid, "typ": "JWT"}
    assert compact.signing_input == f"{header}.{payload}".encode()
    assert compact.signature == base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    assert jws.payload(compact) == jwt.decode(token, options={"verify_signature": False})


def test_the_reader_is_exactly_as_strict_as_pyjwt_on_unpadded_segments() -> None:
    rng = random.Random(20261130)
    junk = ALPHABET + "=+/ .~\u00e9\u0661"
    checked = accepted = 0
    for _ in range(20_000):
        segment = "".join(rng.choice(ALPHABET if rng.random() < 0.9 else junk) for _ in range(rng.randrange(1, 13)))
        if "=" in segment:
            continue  # padding: see test_padding_is_refused
        try:
            expected: bytes | None = PyJWS._decode_base64url_segment(segment.encode(), "x")
        except (jwt.DecodeError, UnicodeEncodeError):
            expected = None
        token = f"{b64json({'alg': 'RS256'})}.e30.{segment}"
        try:
            got: bytes | None = jws.parse(token).signature
        except jws.MalformedError:
            got = None
        assert got == expected, segment
        checked += 1
        accepted += got is not None
    assert checked > 15_000 and 2_000 < accepted < checked - 2_000  # both sides of the line were exercised


@pytest.mark.parametrize(
    ("token", "says"),
    [
        pytest.param("", "three base64url segments", id="empty"),
        pytest.param("e30.e30", "three base64url segments", id="two-segments"),
        pytest.param("e30.e30.e30.e30.e30", "three base64url segments", id="five-segments-a-JWE"),
        pytest.param(".e30.", "three base64url segments", id="empty-header"),
        pytest.param("e30..", "three base64url segments", id="empty-payload"),
        pytest.param("e30=.e30.", "three base64url segments", id="padded-header"),
        pytest.param("e30.e30=.", "three base64url segments", id="padded-payload"),
        pytest.param("e30.e30.AA==", "three base64url segments", id="padded-signature"),
        pytest.param("e30.e30.ab+/", "three base64url segments", id="standard-base64-alphabet"),
        pytest.param("e30.e30.ab cd", "three base64url segments", id="space"),
        pytest.param("e30.e30.abc\n", "three base64url segments", id="trailing-newline"),
        pytest.param("e30.e30.\u0661\u0662", "three base64url segments", id="arabic-digits"),
        pytest.param("e30.e30.\uff21\uff22", "three base64url segments", id="fullwidth-letters"),
        pytest.param("e30\u00e9.e30.", "three base64url segments", id="non-ascii-letter"),
        pytest.param("e30.e30.a", "length", id="signature-of-impossible-length"),
        pytest.param("e30aa.e30.", "length", id="header-of-impossible-length"),
        pytest.param("e30.e.", "length", id="payload-of-impossible-length"),
        pytest.param("e31.e30.", "not canonical", id="header-non-canonical"),
        pytest.param("e30.e30.AB", "not canonical", id="signature-non-canonical"),
        pytest.param(b64url(b"\xff\xfe{}") + ".e30.", "not UTF-8", id="header-not-utf8"),
        pytest.param(b64url(b"{'alg': 'RS256'}") + ".e30.", "not JSON", id="header-not-json"),
        pytest.param(b64json(["RS256"]) + ".e30.", "not a JSON object", id="header-a-list"),
        pytest.param(b64json("RS256") + ".e30.", "not a JSON object", id="header-a-string"),
        pytest.param(b64url(b"[" * 6000) + ".e30.", "not JSON", id="header-nested-past-the-recursion-limit"),
        pytest.param(b64json({"alg": "RS256", "x": "y" * jws.MAX_HEADER_CHARS}) + ".e30.", "over", id="huge-header"),
    ],
)
def test_what_is_not_a_compact_jws_is_refused_with_its_reason(token: str, says: str) -> None:
    with pytest.raises(jws.MalformedError, match=says) as caught:
        jws.parse(token)
    assert token[:8] not in str(caught.value) or not token  # the reason never quotes the token


def test_a_header_just_under_the_bound_is_read() -> None:
    header = {"alg": "RS256", "x": ""}
    header["x"] = "y" * (jws.MAX_HEADER_CHARS * 3 // 4 - len(json.dumps(header, separators=(",", ":"))))
    segment = b64json(header)
    assert len(segment) <= jws.MAX_HEADER_CHARS

    assert jws.parse(f"{segment}.e30.").header == header


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        pytest.param(b"not json", "not JSON", id="not-json"),
        pytest.param(b"[1, 2]", "not a JSON object", id="a-list"),
        pytest.param(b"\xc3\x28", "not UTF-8", id="not-utf8"),
        pytest.param(b"[" * 20_000, "not JSON", id="nested-past-the-recursion-limit"),
    ],
)
def test_a_payload_that_is_not_a_json_object_is_refused_when_read(payload: bytes, says: str) -> None:
    compact = jws.parse(f"e30.{b64url(payload)}.")  # the payload is read only on request

    with pytest.raises(jws.MalformedError, match=says):
        jws.payload(compact)


# --- hostile tokens through the verifier ---


async def test_a_signature_spelled_non_canonically_is_refused_though_it_decodes_to_the_valid_one(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock
) -> None:
    token = issuer.mint("system:serviceaccount:a:b", now=clock())
    head, signature = token.rsplit(".", 1)
    respelled = f"{head}.{with_last_char_bumped(signature)}"
    # A lenient base64 decoder reads both spellings as the same signature bytes.
    assert base64.urlsafe_b64decode(respelled.rsplit(".", 1)[1] + "==") == base64.urlsafe_b64decode(signature + "==")

    assert (await refused(verifier, respelled)).code == "malformed_token"
    assert (await verifier.verify(token)).identity.subject == "system:serviceaccount:a:b"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda token: token.replace(".", "=.", 1), id="padding-after-the-header"),
        pytest.param(lambda token: token + "=", id="padding-after-the-signature"),
        pytest.param(lambda token: token + ".", id="a-fourth-empty-segment"),
        pytest.param(lambda token: token.replace("-", "+").replace("_", "/"), id="standard-base64"),
        pytest.param(lambda token: " " + token, id="leading-space"),
        pytest.param(lambda token: token.split(".", 1)[0] + "." + token.split(".", 1)[1].replace(".", "..", 1),
                     id="a-doubled-dot"),
    ],
)
async def test_a_validly_signed_token_mangled_in_its_framing_is_malformed(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock, make: Any
) -> None:
    token = issuer.mint("system:serviceaccount:a:b", now=clock())
    mangled = make(token)
    assert mangled != token
    before = metric("irsa_cache_token_verifications_total", result="malformed_token")

    error = await refused(verifier, mangled)

    assert error.code == "malformed_token"
    assert metric("irsa_cache_token_verifications_total", result="malformed_token") == before + 1


async def test_a_non_ascii_token_is_malformed(verifier: TokenVerifier, issuer: Issuer, clock: FakeClock) -> None:
    token = issuer.mint("system:serviceaccount:a:b", now=clock())

    assert (await refused(verifier, token[:10] + "\u00e9" + token[11:])).code == "malformed_token"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        pytest.param({"alg": "RS256", "kid": None}, "malformed_token", id="kid-null"),
        pytest.param({"alg": "RS256", "kid": 7}, "malformed_token", id="kid-a-number"),
        pytest.param({"alg": "RS256", "crit": ["exp"], "exp": 1}, "malformed_token", id="crit-unknown-extension"),
        pytest.param({"alg": "RS256", "b64": False, "crit": ["b64"]}, "malformed_token", id="crit-b64-unencoded"),
        pytest.param({"alg": "RS256", "crit": []}, "malformed_token", id="crit-empty"),
        pytest.param({"alg": {"RS256": 1}}, "algorithm_not_allowed", id="alg-an-object"),
        pytest.param({"alg": "rs256"}, "algorithm_not_allowed", id="alg-lower-case"),
        pytest.param({"alg": "RS256 "}, "algorithm_not_allowed", id="alg-with-a-space"),
    ],
)
async def test_header_fields_of_a_signed_token_are_checked_before_the_key_is_used(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock, header: dict[str, Any], code: str
) -> None:
    header = {"kid": issuer.kid, **header}
    token = signed(issuer, header, json.dumps(claims_at(clock(), issuer=issuer.url)).encode())

    assert (await refused(verifier, token)).code == code


async def test_a_huge_header_is_refused_before_it_is_parsed(verifier: TokenVerifier, issuer: Issuer, clock: FakeClock) -> None:
    header = {"alg": "RS256", "kid": issuer.kid, "x5c": ["A" * 10_000]}
    token = signed(issuer, header, json.dumps(claims_at(clock(), issuer=issuer.url)).encode())

    error = await refused(verifier, token)

    assert error.code == "malformed_token"
    assert f"over {jws.MAX_HEADER_CHARS} characters" in error.message


async def test_the_payload_of_a_token_whose_signature_fails_is_never_read(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock
) -> None:
    # Not JSON, and signed by nobody: the signature is what is refused.
    header = b64json({"alg": "RS256", "kid": issuer.kid})
    token = f"{header}.{b64url(b'[' * 5000)}.{b64url(bytes(256))}"

    assert (await refused(verifier, token)).code == "bad_signature"


async def test_an_es256_signature_of_the_wrong_length_is_a_bad_signature(
    verifier: TokenVerifier, issuer: Issuer, clock: FakeClock, ec_key: Any
) -> None:
    token = jwt.encode(claims_at(clock(), issuer=issuer.url), ec_key, algorithm="ES256", headers={"kid": "ec-key-1"})
    head, signature = token.rsplit(".", 1)
    short = b64url(base64.urlsafe_b64decode(signature + "==")[:-1])

    assert (await refused(verifier, f"{head}.{short}")).code == "bad_signature"
