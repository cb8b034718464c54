"""The webhook's serving certificate: loaded from two PEM files, reloaded when they change.

cert-manager renews the certificate into a Secret and the kubelet swaps the mounted
files (one symlink, so both change together); a hand-made Secret changes the same
way. `watch()` rereads both files every few seconds and, when their bytes changed,
loads them into the same `ssl.SSLContext` the listener uses: OpenSSL copies the
certificate into each connection when the connection starts, so every new handshake
gets the new one and open connections are not disturbed. A pair that does not load
(a key that does not match, a file half written) is first tried on a scratch context
and never reaches the live one: the old certificate is served on, and the next look
tries again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from daemon.webhook import metrics

log = logging.getLogger(__name__)


class TlsFilesError(Exception):
    """The certificate or key cannot be used; the message names the file and why."""


class ReloadingCertificate:
    """An SSLContext for the listener, kept in step with the certificate files."""

    def __init__(self, *, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = _server_context()
        self.not_after: datetime | None = None
        self._digest = b""

    def load(self) -> bool:
        """Load the files if they changed since the last load. True if a new pair is in use;
        raises TlsFilesError (the old pair stays in use) if the new one is unusable."""
        try:
            cert_pem, key_pem = self.cert_file.read_bytes(), self.key_file.read_bytes()
        except OSError as exc:
            raise TlsFilesError(f"cannot read {exc.filename}: {exc.strerror}") from exc
        digest = hashlib.sha256(len(cert_pem).to_bytes(8, "big") + cert_pem + key_pem).digest()
        if digest == self._digest:
            return False
        try:
            leaf = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise TlsFilesError(f"{self.cert_file}: not a PEM certificate ({exc})") from exc
        try:  # first on a scratch context: a bad pair must not touch the live one
            _server_context().load_cert_chain(self.cert_file, self.key_file)
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as exc:
            raise TlsFilesError(
                f"{self.cert_file} with {self.key_file}: {exc.reason or exc} (does the key belong to the certificate?)"
            ) from exc
        self._digest = digest
        self.not_after = leaf.not_valid_after_utc
        metrics.CERTIFICATE_EXPIRY.set(self.not_after.timestamp())
        return True

    @property
    def expired(self) -> bool:
        return self.not_after is not None and self.not_after <= datetime.now(UTC)

    async def watch(self, interval_seconds: float) -> None:
        """Reload whenever the files change, until cancelled."""
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                if self.load():
                    metrics.CERTIFICATE_RELOADS.labels(result="success").inc()
                    log.info("serving certificate reloaded", extra={
                        "cert_file": str(self.cert_file), "not_after": str(self.not_after)})
            except TlsFilesError as exc:
                metrics.CERTIFICATE_RELOADS.labels(result="error").inc()
                log.warning("serving certificate not reloaded, the previous one is kept: %s", exc)


def _server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # what the API server's client accepts, at least
    return context
