"""Reading a JWS in compact form (RFC 7515, section 7.1): `header.payload.signature`.

Each segment is base64url without padding. This module splits a token, checks and
decodes its segments and parses its header; it verifies nothing. `tokens.py` picks
the key and the algorithm from the header, verifies the signature with the key's
PyJWT algorithm object (cryptography underneath), and only then has the payload
parsed here: the claims of a token whose signature fails are never read.

Why not PyJWT's own reader: it checks the base64url alphabet one character at a time
in Python and reads each token twice (once for the header, once to verify), which
cost several times the RSA check itself on every first request. Here one regular
expression checks the whole token, in C, and each segment is decoded once. It is as
strict: only the base64url alphabet, no padding, no segment of an impossible length,
no non-canonical encoding (unused trailing bits must be zero, so that a token has one
spelling), a header that is a JSON object of bounded size.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

# A real header is {"alg":"RS256","kid":"<40 characters>"}; even one carrying a
# certificate chain fits. Anything longer is refused before it is parsed.
MAX_HEADER_CHARS = 8192

_COMPACT = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# A segment of 4n+2 characters ends in 4 unused bits, one of 4n+3 in 2: they must be zero.
_UNUSED_BITS = {2: 0b1111, 3: 0b11}


class MalformedError(ValueError):
    """Not a JWS in compact form; the message says which part is wrong (never quoting it)."""


@dataclass(frozen=True, slots=True)
class Compact:
    """A token split and checked: the header parsed, the payload still encoded."""

    header: dict[str, Any]
    signing_input: bytes  # what the signature covers: the first two segments, as sent
    payload_segment: str
    signature: bytes


def parse(token: str) -> Compact:
    """Split `token` and decode its header and signature; MalformedError if it is not a compact JWS."""
    match = _COMPACT.fullmatch(token)
    if match is None:
        raise MalformedError("not three base64url segments separated by dots")
    header_segment, payload_segment, signature_segment = match.groups()
    if len(header_segment) > MAX_HEADER_CHARS:
        raise MalformedError(f"its header is over {MAX_HEADER_CHARS} characters")
    header = _json_object(decode_segment(header_segment, "header"), "header")
    signature = decode_segment(signature_segment, "signature")
    decode_segment(payload_segment, "payload", check_only=True)
    return Compact(header=header, signing_input=token[: match.end(2)].encode("ascii"),
                   payload_segment=payload_segment, signature=signature)


def payload(compact: Compact) -> dict[str, Any]:
    """The claims: call only once the signature has verified."""
    return _json_object(decode_segment(compact.payload_segment, "payload"), "payload")


def decode_segment(segment: str, name: str, *, check_only: bool = False) -> bytes:
    """One base64url segment (alphabet already checked) to bytes."""
    remainder = len(segment) % 4
    if remainder == 1:
        raise MalformedError(f"its {name} segment has a length no base64url text has")
    if remainder and _ALPHABET.index(segment[-1]) & _UNUSED_BITS[remainder]:
        raise MalformedError(f"its {name} segment is not canonical base64url")
    if check_only:
        return b""
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):  # not reached for text that passed the checks above
        raise MalformedError(f"its {name} segment is not base64url") from None


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise MalformedError(f"its {name} is not UTF-8") from None
    except (ValueError, RecursionError):
        raise MalformedError(f"its {name} is not JSON") from None
    if not isinstance(value, dict):
        raise MalformedError(f"its {name} is not a JSON object")
    return value
