"""A certificate authority and serving certificates made in the test, with cryptography:
what cert-manager (or the README's openssl commands) would put in the webhook's Secret."""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Authority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def client_context(self) -> ssl.SSLContext:
        """What the API server does: trust this CA (its caBundle) and check the name."""
        context = ssl.create_default_context(cadata=self.pem.decode())
        return context


def authority(name: str = "irsa-cache test CA") -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, certificate)


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    cert_pem: bytes
    key_pem: bytes

    @property
    def serial(self) -> int:
        return self.certificate.serial_number


def issue(ca: Authority, *, names: tuple[str, ...] = ("localhost", "127.0.0.1"),
          lifetime: timedelta = timedelta(hours=1)) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.certificate.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + lifetime)
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Issued(certificate, certificate.public_bytes(serialization.Encoding.PEM), key_pem)


def install(issued: Issued, directory: Path) -> tuple[Path, Path]:
    """Write tls.crt and tls.key as the kubelet updates a Secret volume: each file replaced
    whole by a rename, never seen half written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "tls.crt", directory / "tls.key"
    for path, data in zip(paths, (issued.cert_pem, issued.key_pem), strict=True):
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
    return paths


def served_serial(der: bytes | None) -> int:
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
